"""Runs inside each vLLM worker (``LLM.apply_model``, through engine.py's "watch"): how much pruning
work the engine did, counted where it would be done: the [CLS] saliency (``tower.cls_saliency``),
the Qwen saliency fold (``qwen_tower.merged_saliency``) and the width of each batch of
embedded image texts (``desap_texts``). Counting only: every call still returns what it did."""
from desap_ops.integrations.vllm import qwen_tower, tower


def watch_pruning_work(model):
    work = model.desap_pruning_work = {"cls_saliency": 0, "merged_saliency": 0, "text_widths": []}

    def counted(module, name):
        function = getattr(module, name)

        def wrapper(*args, **kwargs):
            work[name] += 1
            return function(*args, **kwargs)
        setattr(module, name, wrapper)

    counted(tower, "cls_saliency")
    counted(qwen_tower, "merged_saliency")
    texts = model.desap_texts

    def desap_texts(text_ids, reads):
        embedded, mask = texts(text_ids, reads)
        work["text_widths"].append(int(embedded.shape[1]))
        return embedded, mask

    model.desap_texts = desap_texts


def pruning_work(model):
    return model.desap_pruning_work
