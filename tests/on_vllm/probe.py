"""Runs inside each vLLM worker (``LLM.apply_model``): what the model is and what it pruned. A
module of its own so the workers can import it by name."""


def history(model):
    return {"class": type(model).__name__,
            "history": [{name: value.tolist() for name, value in record.items()}
                        for record in getattr(model, "desap_history", [])]}
