"""The masked training loop shared by --recover and fw-jax finetune (fw_jax.pipeline._training):
which steps are evaluated, which weights are kept, when it stops, what on_step hears, on a toy
problem whose losses are scripted."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from fw_jax.pipeline._training import linear_weights_filter, nonzero_masks, train_masked


def _run(train_losses, held_losses, *, steps, eval_every=1, patience=None, start=0, best_loss=10.0):
    """train_masked on a scalar "weight" that counts the steps; losses come from the scripts."""
    events, batches_seen = [], []
    held = iter(held_losses)

    def step(w, s, batch):
        batches_seen.append(batch)
        return w + 1, s + 10, train_losses[batch]

    trained = train_masked(step, jnp.asarray(float(start)), jnp.asarray(0.0), lambda t: (t,), steps=steps,
                           eval_every=eval_every, held_loss=lambda w: next(held), best="given", best_loss=best_loss,
                           start=start, patience=patience, on_step=events.append)
    return trained, events, batches_seen


def test_the_best_evaluated_weights_are_kept_and_every_step_is_told():
    trained, events, seen = _run([5.0] * 6, [3.0, 1.0, 2.0], steps=6, eval_every=2)
    assert seen == list(range(6)) and trained.stopped == "steps" and trained.steps == 6
    assert [e.step for e in events] == [1, 2, 3, 4, 5, 6]
    assert [e.held for e in events] == [None, 3.0, None, 1.0, None, 2.0]
    assert trained.best_step == 4 and trained.best_loss == 1.0 and float(trained.best) == 4.0
    assert float(trained.weights) == 6.0 and float(trained.opt_state) == 60.0
    assert all(e.stopping is None for e in events)


def test_the_last_step_is_evaluated_and_nothing_better_keeps_the_given_best():
    trained, events, _ = _run([5.0] * 5, [11.0, 12.0, 13.0], steps=5, eval_every=2)
    assert [e.step for e in events if e.held is not None] == [2, 4, 5]
    assert trained.best == "given" and trained.best_step == 0 and trained.best_loss == 10.0


def test_patience_stops_early_and_says_so_on_the_last_step():
    trained, events, seen = _run([5.0] * 10, [4.0, 6.0, 7.0, 1.0], steps=10, patience=2)
    assert trained.stopped == "early" and trained.steps == 3 and len(seen) == 3
    assert events[-1].stopping == "early" and trained.best_step == 1


@pytest.mark.parametrize("train_losses, held_losses, last", [
    ([5.0, math.nan, 5.0, 5.0], [4.0], 2),  # a non-finite training loss: no evaluation after it
    ([5.0, 5.0, 5.0, 5.0], [4.0, math.inf], 2),  # a non-finite held-out loss stops training too
])
def test_a_nonfinite_loss_stops_and_keeps_the_best_so_far(train_losses, held_losses, last):
    trained, events, _ = _run(train_losses, held_losses, steps=4)
    assert trained.stopped == "nonfinite" and trained.steps == last and events[-1].stopping == "nonfinite"
    assert trained.best_step == 1 and float(trained.best) == 1.0


def test_a_resumed_run_starts_after_its_saved_step():
    trained, events, seen = _run([5.0] * 6, [2.0, 3.0], steps=6, eval_every=2, start=2, best_loss=2.5)
    assert seen == [2, 3, 4, 5] and [e.step for e in events] == [3, 4, 5, 6]
    assert trained.best_step == 4 and trained.steps == 6


def test_the_best_weights_are_a_copy_that_a_donating_step_cannot_change():
    weights = {"w": jnp.arange(3.0)}

    def step(w, s, _):
        return {"w": w["w"] + 1}, s, 0.0

    trained = train_masked(step, weights, None, lambda t: (t,), steps=2, eval_every=1,
                           held_loss=lambda w: -float(w["w"][0]) if float(w["w"][0]) < 1.5 else 0.0,
                           best=weights, best_loss=0.0)
    assert trained.best_step == 1 and trained.best["w"] is not trained.weights["w"]
    np.testing.assert_array_equal(trained.best["w"], [1.0, 2.0, 3.0])


def test_the_masks_and_the_weight_filter():
    masks = nonzero_masks({"a": jnp.array([0.0, 2.0]), "b": jnp.array([[1.0, 0.0]])})
    np.testing.assert_array_equal(masks["a"], [False, True])
    np.testing.assert_array_equal(masks["b"], [[True, False]])
    keep = linear_weights_filter(["mlp.up.weight"])
    assert keep(("mlp", "up", "weight"), None) and not keep(("mlp", "up", "bias"), None)
