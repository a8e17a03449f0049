"""--epochs: whole passes over the training set, counted in updates once the data is batched;
the same count on any number of processes, for the schedule, the progress and a resumed run."""

import json
from collections import Counter
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

from smoa_mlx import checkpoint
from smoa_mlx.data import Batcher
from smoa_mlx.options import epoch_updates, resolve
from smoa_mlx.schedule import warmup_schedule
from smoa_mlx.train import train

from test_train import _interrupt_at, adapter_file, assert_same_tensors, opts, train_losses


@pytest.mark.parametrize("n,batch,accum,epochs", [(32, 4, 1, 1), (13, 4, 3, 2), (10, 4, 2, 3),
                                                  (7, 2, 4, 1)])
def test_epochs_count_passes_of_every_process(n, batch, accum, epochs):
    """The updates --epochs resolves to make every example of the training set pass through
    (all ranks together) at least `epochs` times, and one update fewer would not; the
    global batch does not depend on the number of processes, so neither does the count."""
    examples = [SimpleNamespace(tokens=list(range(3 + i % 5)), prompt_len=0) for i in range(n)]
    counts = set()
    for world in (1, 2):
        ranks = [Batcher(examples, batch // world, 64, seed=1, rank=r, world_size=world)
                 for r in range(world)]
        updates = epoch_updates(epochs, ranks[0].num_batches, accum)
        counts.add(updates)
        seen = [Counter() for _ in range(updates)]
        for u in range(updates):
            for micro in range(u * accum, (u + 1) * accum):
                for b in ranks:
                    group = b.group(micro)
                    seen[u].update(i for i in group[b.rank::world] if i >= 0)
        total = sum(seen, Counter())
        assert min(total[i] for i in range(n)) >= epochs
        fewer = sum(seen[:-1], Counter())
        assert min(fewer[i] for i in range(n)) < epochs
    assert len(counts) == 1


def test_iters_and_epochs_are_one_setting(tmp_path):
    with pytest.raises(ValueError, match="^--iters and --epochs both given"):
        resolve({"iters": 5, "epochs": 2})
    cfg = tmp_path / "c.yaml"
    cfg.write_text("iters: 5\nepochs: 2\n")
    with pytest.raises(ValueError, match=f"^{cfg}: iters and epochs both given"):
        resolve({"config": str(cfg)})
    cfg.write_text("iters: 5\n")
    o, _ = resolve({"config": str(cfg), "epochs": 2})  # the flag overrides the file's length
    assert (o.iters, o.epochs, o.warmup) == (None, 2, None)  # counted once the data is batched
    o, _ = resolve({"config": str(cfg)})
    assert (o.iters, o.epochs) == (5, None)


def test_an_epochs_run_does_its_updates_and_resumes_with_the_same_count(tiny_model_dir, arith, tmp_path, monkeypatch, capsys):
    """32 examples in batches of 4 are 8 batches a pass; 2 passes with 3 batches an update
    are 6 updates (the last one takes 2 batches of the third pass)."""
    args = opts(tiny_model_dir, arith, tmp_path / "straight", epochs=2, grad_accumulation_steps=3,
                warmup=None, learning_rate=1e-2)
    del args["iters"]
    r = train(args)
    out = capsys.readouterr().out
    assert r["steps"] == 6 and "2 epochs of 8 batches of 4 = 6 updates of 3 batches" in out
    assert "Iter 6/6:" in out  # the progress knew the count
    config = json.loads((tmp_path / "straight" / "adapter_config.json").read_text())
    assert (config["iters"], config["epochs"], config["warmup"]) == (6, 2, 0)
    # The schedule saw it too: update k used the rate of a 6-update cosine at k - 1.
    rows = [json.loads(x) for x in (tmp_path / "straight" / checkpoint.METRICS).read_text().splitlines()]
    lrs = [r["learning_rate"] for r in rows if r["type"] == "train"]
    expected = warmup_schedule(1e-2, 6, 0, "cosine")
    np.testing.assert_allclose(lrs, [expected(mx.array(k)).item() for k in range(6)], atol=1e-9)

    out = tmp_path / "cut"
    _interrupt_at(monkeypatch, 10)  # in update 4
    with pytest.raises(KeyboardInterrupt):
        train({**args, "adapter_path": str(out)})
    monkeypatch.undo()
    assert checkpoint.load(out / checkpoint.STATE).meta["step"] == 3
    assert train({"adapter_path": str(out), "resume": True})["steps"] == 6
    expected = train_losses(tmp_path / "straight")
    got = train_losses(out)
    np.testing.assert_allclose([got[s] for s in range(1, 7)], [expected[s] for s in range(1, 7)], atol=1e-6)
    assert_same_tensors(adapter_file(out), adapter_file(tmp_path / "straight"), atol=1e-6)
    # Asked for a third pass, the resumed run counts 3 passes: ceil(24 / 3) = 8 updates.
    assert train({"adapter_path": str(out), "resume": True, "epochs": 3})["steps"] == 8
