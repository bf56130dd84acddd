"""Runs inside each vLLM worker (``LLM.apply_model``): what the model is and what it pruned. A
module of its own so the workers can import it by name."""


def history(model):
    return {"class": type(model).__name__,
            "history": [{name: value.tolist() for name, value in record.items()}
                        for record in getattr(model, "desap_history", [])]}


def watch_positions(model):
    """Record the rotary positions of every forward of the model from now on."""
    model.desap_positions_seen = []

    def record(module, args, kwargs):
        positions = kwargs["positions"] if "positions" in kwargs else args[1]
        model.desap_positions_seen.append(positions.tolist())

    model.register_forward_pre_hook(record, with_kwargs=True)


def positions_seen(model):
    """The positions recorded since the last call, one entry per forward."""
    seen, model.desap_positions_seen = model.desap_positions_seen, []
    return seen
