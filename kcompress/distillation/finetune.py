"""Fine-tuning a compressed model against a teacher: structured pruning's rounds with knowledge distillation.

:func:`teacher_fine_tune` builds the ``fine_tune`` hook of :func:`kcompress.pruning.structured.prune_structured`
from a teacher (``prune.teacher``): each round's pruned model is trained by :func:`kcompress.distillation.trainer.
distill` with the round's epochs, rate and seed, the ``distill`` section's temperature, alpha and teacher cache,
and the ``train`` section's recipe (with augmentation the teacher sees the augmented batch).

Gotcha: the teacher is any model with the student's input and classes, usually the model the pipeline started
from (``baseline``), not the unpruned input of this stage: a distilled student pruned in a pipeline then keeps
learning from the large teacher rather than from itself.
"""

from __future__ import annotations

from typing import Callable, Optional

from kcompress.data import DataSource
from kcompress.distillation.trainer import distill
from kcompress.options import DistillOptions, TrainOptions

__all__ = ["teacher_fine_tune"]


def teacher_fine_tune(teacher, train: DataSource, val: Optional[DataSource], batch_size: int,
                      options: Optional[DistillOptions] = None, train_options: Optional[TrainOptions] = None,
                      verbose: Optional[int] = None,
                      log: Optional[Callable[[str], None]] = None) -> Callable[..., float]:
    """The ``fine_tune(model, epochs=, lr=, seed=, checkpoint_dir=, resume=, what=)`` hook: distills ``teacher``
    into ``model`` in place and returns the best epoch's VAL accuracy (nan without ``val``)."""
    base = options or DistillOptions()
    say = log or (lambda _msg: None)

    def fine_tune(model, *, epochs: int, lr: float, seed: int, checkpoint_dir: Optional[str] = None,
                  resume: bool = False, what: str = "fine-tune") -> float:
        opts = base.replace(epochs=epochs, lr=lr, batch_size=batch_size, patience=None)
        say(f"{what}: knowledge distillation from the teacher (T={opts.temperature:g}, alpha {opts.alpha:g}) "
            "with the labels")
        r = distill(teacher, model, train, val, opts, seed=seed, checkpoint_dir=checkpoint_dir, resume=resume,
                    train_options=train_options, verbose=verbose, log=say)
        return r.student_accuracy if r.student_accuracy is not None else float("nan")

    return fine_tune
