"""Runs inside each vLLM worker (``LLM.apply_model``): what the model is and what it pruned. A
module of its own so the workers can import it by name."""


def history(model):
    return {"class": type(model).__name__,
            "history": [{name: None if value is None else value.tolist() for name, value in record.items()}
                        for record in getattr(model, "desap_history", [])]}


def watch_positions(model):
    """Record the rotary positions of every forward of the model from now on (one hook, however
    many jobs an engine runs)."""
    model.desap_positions_seen = []
    if getattr(model, "desap_positions_hook", None) is not None:
        return

    def record(module, args, kwargs):
        positions = kwargs["positions"] if "positions" in kwargs else args[1]
        module.desap_positions_seen.append(positions.tolist())

    model.desap_positions_hook = model.register_forward_pre_hook(record, with_kwargs=True)


def positions_seen(model):
    """The positions recorded since the last call, one entry per forward."""
    seen, model.desap_positions_seen = model.desap_positions_seen, []
    return seen


def forget_job(model):
    """What a fresh engine's model holds before its first job: no DeSAP history, no positions
    recorded (``engine.py --serve``, between two jobs)."""
    if hasattr(model, "desap_history"):
        model.desap_history.clear()
    if getattr(model, "desap_positions_hook", None) is not None:
        model.desap_positions_hook.remove()
        model.desap_positions_hook = None
    model.desap_positions_seen = []
