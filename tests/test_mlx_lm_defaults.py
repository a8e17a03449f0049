"""An mlx_lm.lora config trains here what mlx_lm.lora trains: the keys it leaves out take
mlx_lm.lora's CONFIG_DEFAULTS. Both sides are set up by their own code (mlx-lm's main and
train_model, this package's train) and stopped where the training loop would start."""

import types

import mlx.core as mx
import numpy as np
import pytest
import yaml
from mlx.utils import tree_flatten, tree_map

import smoa_mlx.train as smoa_train


@pytest.fixture(scope="module")
def tiny16(tmp_path_factory):
    """The tiny Llama with 16 layers: mlx-lm's default num_layers adapts the last 16."""
    from smoa_mlx.synthetic import make_llama

    return make_llama(tmp_path_factory.mktemp("tiny16") / "model", num_hidden_layers=16)


CASES = {
    "only fine_tune_type": {"fine_tune_type": "lora"},
    "lora_parameters without scale": {"lora_parameters": {"rank": 4, "keys": ["self_attn.q_proj"]}},
    "adamw and an lr_schedule": {
        "fine_tune_type": "lora", "optimizer": "adamw", "num_layers": 3, "iters": 20,
        "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0,
                            "keys": ["self_attn.q_proj", "mlp.down_proj"]},
        "lr_schedule": {"name": "cosine_decay", "warmup": 3, "warmup_init": 1e-7,
                        "arguments": [1e-3, 17, 1e-6]}},
    "dora and sgd": {"fine_tune_type": "dora", "optimizer": "sgd", "learning_rate": 1e-3,
                     "num_layers": 4, "optimizer_config": {"sgd": {"momentum": 0.9}}},
}


class _Stop(Exception):
    pass


def mlx_lm_setup(path, model_dir, monkeypatch) -> tuple:
    """What mlx_lm.lora makes of `-c path`: main's merging of its parser, the file and
    CONFIG_DEFAULTS, then train_model up to its call of the training loop."""
    import mlx_lm.lora as lora
    from mlx_lm import load

    args = vars(lora.build_parser().parse_args(["-c", str(path)]))
    for source in (yaml.load(path.read_text(), lora.yaml_loader), lora.CONFIG_DEFAULTS):
        for key, value in source.items():  # as lora.main: a key not set yet takes the value
            if args.get(key) is None:
                args[key] = value
    args = types.SimpleNamespace(**args)
    # mlx_lm.lora would stop with a KeyError (a lora_parameters mapping replaces its default
    # whole); here each missing entry takes the default's value.
    args.lora_parameters = {**lora.CONFIG_DEFAULTS["lora_parameters"], **args.lora_parameters}
    model, _ = load(str(model_dir))
    seen = {}
    monkeypatch.setattr(lora, "train", lambda **kw: seen.update(kw))
    lora.train_model(args, model, [], [])
    return args, seen["model"], seen["optimizer"], seen["args"]


def smoa_setup(path, monkeypatch) -> tuple:
    """What `python -m smoa_mlx.train -c path` makes of it, up to its training loop."""
    seen = {}

    def loop(model, optimizer, args, *rest):
        seen.update(model=model, optimizer=optimizer, args=args)
        raise _Stop

    monkeypatch.setattr(smoa_train, "Loop", loop)
    with pytest.raises(_Stop):
        smoa_train.train({"config": str(path)})
    return seen["args"], seen["model"], seen["optimizer"]


@pytest.mark.parametrize("case", list(CASES))
def test_an_mlx_lm_config_sets_up_what_mlx_lm_lora_does(case, tiny16, arith, tmp_path, monkeypatch, capsys):
    path = tmp_path / "lora_config.yaml"
    config = {"model": str(tiny16), "data": str(arith), "adapter_path": str(tmp_path / "a"),
              **CASES[case]}
    path.write_text(yaml.safe_dump(config))
    theirs, their_model, their_opt, their_loop = mlx_lm_setup(path, tiny16, monkeypatch)
    ours, our_model, our_opt = smoa_setup(path, monkeypatch)

    # The resolved run: the keys both trainers share, and the count the loops run.
    for key in ("batch_size", "val_batches", "steps_per_report", "steps_per_eval", "save_every",
                "max_seq_length", "grad_accumulation_steps", "grad_checkpoint", "seed",
                "test_batches", "mask_prompt", "num_layers", "optimizer"):
        assert getattr(ours, key) == getattr(theirs, key), key
    if not theirs.lr_schedule:  # else the schedule's arguments[0] is the rate
        assert ours.learning_rate == theirs.learning_rate
    assert ours.iters == their_loop.iters and ours.method == theirs.fine_tune_type
    assert capsys.readouterr().out.count(f"mlx-lm config {path}") == 1  # the resolved settings

    # The same trainable parameters, initialised alike (the same seed, the same order).
    mine = dict(tree_flatten(our_model.trainable_parameters()))
    other = dict(tree_flatten(their_model.trainable_parameters()))
    assert mine.keys() == other.keys() and len(mine) > 0
    for k in mine:
        assert mine[k].shape == other[k].shape, k
        np.testing.assert_array_equal(np.array(mine[k]), np.array(other[k]), err_msg=k)

    # The same optimizer and schedule: identical gradients give identical steps and rates.
    their_opt.init(their_model.trainable_parameters())  # as mlx-lm's loop would (ours did)
    params = [our_model.trainable_parameters()] * 2
    for step in range(min(ours.iters, 25)):
        grads = tree_map(lambda p: mx.random.normal(p.shape, key=mx.random.key(step)), params[0])
        params = [our_opt.apply_gradients(grads, params[0]),
                  their_opt.apply_gradients(grads, params[1])]
        assert our_opt.learning_rate.item() == pytest.approx(their_opt.learning_rate.item(), rel=1e-6)
        for (k, a), (_, b) in zip(tree_flatten(params[0]), tree_flatten(params[1])):
            np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-7,
                                       err_msg=f"{k} at step {step}")
