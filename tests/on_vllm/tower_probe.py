"""Runs inside each vLLM worker (``LLM.apply_model``, through engine.py's "watch"): what the vision
tower is given per call, and how many images each ``embed_multimodal`` call brings."""


def watch_tower(model):
    """Record from now on, per vision-tower call, its input's leading size (LLaVA: crops; Qwen2.5-VL:
    patch rows) and its grids (Qwen2.5-VL), and per ``embed_multimodal`` call, the images it returned."""
    model.desap_tower_calls, model.desap_embed_calls = [], []
    tower = getattr(model, "visual", None) or model.vision_tower

    def record(module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        grid = kwargs.get("grid_thw")
        model.desap_tower_calls.append({"rows": int(x.shape[0]),
                                        "grid": None if grid is None else [list(map(int, g)) for g in grid]})

    tower.register_forward_pre_hook(record, with_kwargs=True)
    embed = model.embed_multimodal

    def counting(**kwargs):
        out = embed(**kwargs)
        model.desap_embed_calls.append(len(out))
        return out

    model.embed_multimodal = counting


def tower_seen(model):
    return {"tower": model.desap_tower_calls, "embed": model.desap_embed_calls}
