"""Runs inside each vLLM worker (``LLM.apply_model``): what the model is and what it pruned. A
module of its own so the workers can import it by name."""


def history(model):
    """The model's class name and its DeSAP records (``desap_history``), as JSON: each record's
    fields by name, tensors as lists (:func:`read_records` reads them back)."""
    from dataclasses import fields

    import torch

    def plain(value):
        return value.tolist() if isinstance(value, torch.Tensor) else value

    return {"class": type(model).__name__,
            "history": [{field.name: plain(getattr(record, field.name)) for field in fields(record)}
                        for record in getattr(model, "desap_history", [])]}


def read_records(rows: list) -> list:
    """The records :func:`history` wrote, as ``PruneRecord`` again (JSON keeps a list of ints
    apart from one of floats: int64 and float32 tensors, as the records held)."""
    import torch

    from desap_ops.integrations.common.record import PruneRecord

    return [PruneRecord(**{name: torch.tensor(value) if isinstance(value, list) else value
                           for name, value in row.items()}) for row in rows]


def read_ranks(ranks: list) -> list:
    """Each rank's entry of :func:`history` with its records read back (:func:`read_records`)."""
    return [{**rank, "history": read_records(rank["history"])} for rank in ranks]


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
