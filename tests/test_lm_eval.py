"""lm-evaluation-harness with the `smoa_mlx` model (base + an SMoA adapter, unfused): a local
multiple-choice task run by lm-eval itself scores every choice exactly as
`smoa_mlx.evaluate`'s log-likelihood scoring does, across tokenization boundaries;
loglikelihood_rolling, generate_until and the front end agree with our own paths."""

import functools
import json
import sys

import numpy as np
import pytest

import smoa_mlx
from smoa_mlx.data import common_prefix
from smoa_mlx.evaluate import candidate_logprobs, document_nll, evaluate_items
from smoa_mlx.tasks import Item

TASK = "smoa_tiny_mc"
# (context, choices, gold). Cuts inside a word ("hap" + "py.": joint tokens merge across
# it) and after a trailing space ("little " + "girl") on purpose.
ITEMS = [
    ("Lily went to the park. She saw a big", [" dog", " tree", " sun"], 0),
    ("Tom was very hap", ["py.", "pily"], 0),
    ("Once upon a time, there was a little ", ["girl", "boy"], 1),
    ("She said hello to her fri", ["end.", "ends."], 0),
    ("The cat sat on the", [" mat.", " bed.", " moon."], 2),
    ("Ben liked to play with his red", [" ball.", " car.", " cat."], 1),
]
TASK_YAML = f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {{data}}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def lm_eval():
    return pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'smoa-mlx[lmeval]')")


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """No hub: the dataset is a local JSON lines file; datasets' cache in tmp."""
    with pytest.MonkeyPatch.context() as mp:
        for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
            mp.setenv(var, "1")
        mp.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_datasets")))
        yield


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm_eval_task")
    (d / "items.jsonl").write_text("".join(
        json.dumps({"context": c, "choices": o, "gold": g}) + "\n" for c, o, g in ITEMS))
    (d / "task.yaml").write_text(TASK_YAML.format(data=d / "items.jsonl"))
    return d


@pytest.fixture(scope="module")
def adapter(stories_dir, make_adapter, tmp_path_factory):
    return make_adapter(stories_dir, tmp_path_factory.mktemp("lm_eval") / "smoa", seed=3)


def _instances(kind, args):
    """lm-eval requests as its tasks make them."""
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_lm_eval_task_scores_as_smoa_mlx_evaluate(lm_eval, stories_dir, adapter, task_dir, offline):
    from lm_eval.tasks import TaskManager

    import smoa_mlx.lm_eval.model  # noqa: F401  (registers "smoa_mlx")

    out = lm_eval.simple_evaluate(
        model="smoa_mlx", model_args={"model": str(stories_dir), "adapter_path": str(adapter)},
        tasks=[TASK], task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        batch_size=8, log_samples=True, bootstrap_iters=0)
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    theirs = [np.array([r[0] for r in s["filtered_resps"]]) for s in samples]

    model, tokenizer = smoa_mlx.load(str(stories_dir), str(adapter))
    ours = [candidate_logprobs(model, tokenizer, c, o) for c, o, _ in ITEMS]
    for (sums, _), got in zip(ours, theirs):
        np.testing.assert_allclose(got, sums, rtol=0, atol=1e-5)
    # lm-eval's acc (argmax of the sums) from our sums.
    acc = np.mean([np.argmax(sums) == gold for (sums, _), (_, _, gold) in zip(ours, ITEMS)])
    assert out["results"][TASK]["acc,none"] == pytest.approx(acc)
    # smoa_mlx.evaluate's accuracy (mean per token) from lm-eval's sums and our counts.
    items = [Item(c, f"answer{g + 1}", [f"answer{k + 1}" for k in range(len(o))], o) for c, o, g in ITEMS]
    summary, records = evaluate_items(model, tokenizer, "ARC-Easy", items, mode="loglik")
    per_token = [got / counts for got, (_, counts) in zip(theirs, ours)]
    for record, scores in zip(records, per_token):
        np.testing.assert_allclose(record["scores"], scores, atol=2e-6)
    assert summary["accuracy"] == pytest.approx(np.mean([
        np.argmax(s) == gold for s, (_, _, gold) in zip(per_token, ITEMS)]))
    # The test crosses a boundary lm-eval's default split gets wrong (no tokens left).
    context, choice = ITEMS[1][0], ITEMS[1][1][0]
    assert len(tokenizer.encode(context + choice)) <= len(tokenizer.encode(context))
    # The adapter was applied: the base alone scores otherwise.
    base, _ = smoa_mlx.load(str(stories_dir))
    assert not np.allclose(candidate_logprobs(base, tokenizer, *ITEMS[0][:2])[0], theirs[0], atol=1e-3)


def test_requests_agree_with_our_scoring_and_generation(lm_eval, stories_dir, adapter):
    from mlx_lm.generate import generate

    from smoa_mlx.lm_eval.model import SMoALM

    lm = SMoALM(model=str(stories_dir), adapter_path=str(adapter), batch_size="auto",
                max_batch_size=None, device="cpu")  # what lm-eval's CLI passes
    model, tokenizer = lm._model, lm.tokenizer
    # Where the context is cut does not change the score: a trailing space moves.
    (a, _), (b, _) = lm.loglikelihood(_instances("loglikelihood", [
        ("Once upon a time, there was a little ", "girl"), ("Once upon a time, there was a little", " girl")]))
    assert a == pytest.approx(b, abs=1e-6)
    # Rolling log-likelihood: BOS + the text, every token scored (as our perplexity).
    docs = ["Lily and Tom went to the park. They played with a ball.", "The sun was hot."]
    rolling = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(d,) for d in docs]))
    for doc, got in zip(docs, rolling):
        nll, count = document_nll(model, tokenizer, doc, max_length=512)
        assert count == len(tokenizer.encode(doc)) - 1
        assert got == pytest.approx(-nll, abs=1e-4)
    # generate_until: greedy, cut at the first stop string, as mlx-lm's generate then a cut.
    prompts = ["Once upon a time", "Lily saw a"]
    outs = lm.generate_until(_instances("generate_until", [
        (p, {"until": ["."], "max_gen_toks": 24}) for p in prompts]))
    assert all(outs)
    for prompt, got in zip(prompts, outs):
        want = generate(model, tokenizer, tokenizer.encode(prompt), max_tokens=24).split(".")[0]
        assert got == want
    # A greedy continuation is reported greedy; a changed one is not.
    text = generate(model, tokenizer, tokenizer.encode(prompts[0]), max_tokens=4)
    context = tokenizer.encode(prompts[0])  # the greedy tokens re-tokenise as generated
    assert common_prefix(context, tokenizer.encode(prompts[0] + text)) == len(context)
    (_, greedy), (_, other) = lm.loglikelihood(_instances("loglikelihood", [
        (prompts[0], text), (prompts[0], text + " zebra")]))
    assert greedy and not other


def test_front_end_runs_lm_eval_cli(lm_eval, stories_dir, adapter, task_dir, tmp_path, offline, monkeypatch,
                                    capsys):
    from smoa_mlx.lm_eval import main

    from lm_eval import tasks

    monkeypatch.setattr(sys, "argv", sys.argv[:])  # lm-eval's parser reads (and main sets) it
    # Only our task: indexing lm-eval's ~15k built-in tasks takes the CLI 10-20 s.
    monkeypatch.setattr(tasks, "TaskManager", functools.partial(tasks.TaskManager, include_defaults=False))
    main(["--model_args", f"model={stories_dir},adapter_path={adapter}", "--batch_size", "8",
          "--tasks", TASK, "--include_path", str(task_dir), "--output_path", str(tmp_path / "out")])
    (result,) = (tmp_path / "out").rglob("results_*.json")
    acc = json.loads(result.read_text())["results"][TASK]["acc,none"]
    model, tokenizer = smoa_mlx.load(str(stories_dir), str(adapter))
    assert acc == pytest.approx(np.mean([
        np.argmax(candidate_logprobs(model, tokenizer, c, o)[0]) == g for c, o, g in ITEMS]))
    assert TASK in capsys.readouterr().out  # lm-eval's own results table


def test_bad_model_args_are_one_line(lm_eval, stories_dir):
    from smoa_mlx.lm_eval.model import SMoALM

    with pytest.raises(ValueError, match="batch_size must be a positive integer or auto, got 0"):
        SMoALM(model=str(stories_dir), batch_size=0)
    with pytest.raises(ValueError, match="adapter directory not found"):
        SMoALM(model=str(stories_dir), adapter_path=str(stories_dir / "absent"))


def test_missing_lm_eval_is_one_line(monkeypatch):
    from smoa_mlx.lm_eval import main

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # find_spec: not installed
    with pytest.raises(ValueError, match=r"^lm-evaluation-harness is not installed: "
                                         r"pip install 'smoa-mlx\[lmeval\]'"):
        main(["--tasks", TASK])
