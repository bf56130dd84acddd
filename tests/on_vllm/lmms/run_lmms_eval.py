"""Run lmms-eval's command line in this process, as ``lmms-eval ARGS...`` runs it, and record what
vLLM served it (for test_vllm_lmms_eval.py):

    python run_lmms_eval.py RECORD.json ARGS...

RECORD: one entry per ``LLM.chat`` call lmms-eval made (its vLLM model sends each batch through
``chat``): per request, the prompt and output token ids vLLM reports, and then the engine's model
class and DeSAP history on each rank (``probe.history``). lmms-eval itself reports neither, and its
exit status is 0 even when an evaluation fails, so the test reads this record and the result files.
"""
import json
import os
import sys


def main() -> None:
    record, sys.argv = sys.argv[1], ["lmms-eval", *sys.argv[2:]]
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"   # apply_model sends a function to the workers
    from lmms_eval.cli.dispatch import main as lmms_eval
    from vllm import LLM

    from probe import history

    calls, chat = [], LLM.chat

    def recorded_chat(llm, *args, **kwargs):
        outputs = chat(llm, *args, **kwargs)
        calls.append({"requests": [{"prompt_token_ids": list(o.prompt_token_ids),
                                    "output_token_ids": list(o.outputs[0].token_ids)} for o in outputs],
                      "ranks": llm.apply_model(history)})
        return outputs

    LLM.chat = recorded_chat   # lmms-eval's model holds the class itself, so patch the class
    try:
        lmms_eval()
    finally:
        with open(record, "w") as out:
            json.dump(calls, out)


if __name__ == "__main__":
    main()
