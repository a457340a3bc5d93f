"""The demo build: trade-off between experts, determinism, cache, loadable HF dirs, the job config."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from mergesearch.config import load_config
from mergesearch.demo.build import Recipe, build_demo, demo_config_yaml, demo_paths, write_demo_config
from mergesearch.demo.check import REFERENCE_MERGES, exact_match, tradeoff_table
from mergesearch.demo.tasks import EXPERT_TASKS, read_jsonl

#: A recipe that trains for a few steps only: enough to check determinism and caching in ~1 s.
TINY = Recipe(length=4, layers=1, hidden=16, base_steps=3, base_warmup=1, expert_steps=2, expert_warmup=1)
REPO = Path(__file__).resolve().parents[2]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.suffix in {".safetensors", ".jsonl"}}


@pytest.fixture(scope="module")
def table(fast_demo) -> dict[str, dict[str, float]]:
    return tradeoff_table(fast_demo.root, "test")


def test_each_expert_is_best_on_its_own_task(fast_demo, table) -> None:
    # the expert gains at least 0.1 and removes at least half of the base's errors on its task: a fixed margin of
    # 0.2 could not hold where the base already knows a task (on an AVX-512 machine the fast build's base scored
    # 0.80 on sort, its expert 0.996; the base's skill varies with the seed and the CPU's float rounding)
    for task in EXPERT_TASKS:
        own, base = table[f"expert {task}"][task], table["base"][task]
        assert own >= base + 0.1 and 1.0 - own <= 0.5 * (1.0 - base), (task, own, base)
        assert own == max(row[task] for row in table.values()), task
        assert own == pytest.approx(fast_demo.accuracy[task][task], abs=1e-4)  # saved == measured at build


def test_uniform_average_is_clearly_worse_than_the_experts(table) -> None:
    for task in EXPERT_TASKS:
        assert table["uniform average"][task] < table[f"expert {task}"][task] - 0.05, task


def test_different_weights_favour_different_tasks(table) -> None:
    favouring = [label for label in REFERENCE_MERGES if label.startswith("w =")]
    best = [max(favouring, key=lambda label, t=t: table[label][t]) for t in EXPERT_TASKS]
    assert best == favouring  # the merge leaning to expert i is the best merge on task i


def test_saved_dirs_load_with_auto_classes(fast_demo) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(fast_demo.experts["swap"])
    model = AutoModelForCausalLM.from_pretrained(fast_demo.experts["swap"])
    assert (fast_demo.experts["swap"] / "model.safetensors").is_file()
    prompt = "<swap> 1 2 3 4 ="
    ids = tok(prompt)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["<bos>", "<swap>", "1", "2", "3", "4", "="]
    assert tok.decode(ids, skip_special_tokens=True) == prompt
    out = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    assert tok.decode(out[0, len(ids):], skip_special_tokens=True) == "2 1 4 3"


def test_teacher_forced_exact_match_equals_generation(fast_demo) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(fast_demo.base)
    model = AutoModelForCausalLM.from_pretrained(fast_demo.base)
    records = read_jsonl(fast_demo.test["reverse"])[:48]
    hits = []
    for r in records:  # greedy generation, one example at a time (no padding effects)
        ids = torch.tensor([tok(r["prompt"])["input_ids"]])
        out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
        hits.append(out == tok(r["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    assert 0 < sum(hits) < len(hits)  # a case where scoring can actually be wrong
    assert exact_match(model, tok, records) == pytest.approx(sum(hits) / len(hits))


def test_data_files_and_splits(fast_demo) -> None:
    for task in EXPERT_TASKS:
        search, test = read_jsonl(fast_demo.data[task]), read_jsonl(fast_demo.test[task])
        assert (len(search), len(test)) == (128, 512)
        assert not {r["prompt"] for r in search} & {r["prompt"] for r in test}


def test_same_seed_same_files_other_seed_differs(tmp_path) -> None:
    a = _files(build_demo(tmp_path / "a", seed=3, recipe=TINY).root)
    b = _files(build_demo(tmp_path / "b", seed=3, recipe=TINY).root)
    c = _files(build_demo(tmp_path / "c", seed=4, recipe=TINY).root)
    assert len(a) == 3 * 2 + 4 and a == b
    assert a["base/model.safetensors"] != c["base/model.safetensors"]
    assert a["data/sort.jsonl"] != c["data/sort.jsonl"]


def test_cache_reused_until_settings_change(tmp_path) -> None:
    paths = build_demo(tmp_path, seed=0, recipe=TINY)
    weights = paths.experts["sort"] / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    messages: list[str] = []
    start = time.perf_counter()
    again = build_demo(tmp_path, seed=0, recipe=TINY, progress=messages.append)
    assert time.perf_counter() - start < 0.5
    assert weights.stat().st_mtime_ns == stamp and again.accuracy == paths.accuracy
    assert messages and "already built" in messages[0]
    build_demo(tmp_path, seed=1, recipe=TINY)  # other settings: rebuilt
    assert weights.stat().st_mtime_ns != stamp
    stamp = weights.stat().st_mtime_ns
    build_demo(tmp_path, seed=1, recipe=TINY, force=True)
    assert weights.stat().st_mtime_ns != stamp


def test_incomplete_build_is_not_reused(tmp_path) -> None:
    paths = build_demo(tmp_path, seed=0, recipe=TINY)
    (paths.root / "build.json").write_text("{trunc")  # e.g. killed while writing the marker
    messages: list[str] = []
    build_demo(tmp_path, seed=0, recipe=TINY, progress=messages.append)
    assert not any("already built" in m for m in messages)


def test_written_config_validates_and_points_at_the_build(fast_demo) -> None:
    cfg = load_config(fast_demo.config)
    assert Path(cfg.base_model) == fast_demo.base.resolve()
    assert [Path(m) for m in cfg.models] == [fast_demo.experts[t].resolve() for t in EXPERT_TASKS]
    by_name = {o.label: o for o in cfg.objectives}
    assert set(by_name) == {*EXPERT_TASKS, "l1"}
    for task in EXPERT_TASKS:
        assert by_name[task].type == "exact_match" and by_name[task].limit == 128
        assert by_name[task].data == fast_demo.data[task].resolve()
        assert by_name[task].test == fast_demo.test[task].resolve()
    assert by_name["l1"].type == "l1_from_base"


def test_repo_config_is_the_generated_template(tmp_path) -> None:
    text = (REPO / "configs" / "demo.yaml").read_text()
    assert text == demo_config_yaml(REPO / "mergesearch-demo", REPO / "configs")
    written = write_demo_config(tmp_path / "build", path=tmp_path / "configs" / "demo.yaml")
    assert written.read_text() == text.replace("mergesearch-demo", "build")
    cfg = load_config(REPO / "configs" / "demo.yaml")
    assert cfg.objectives[0].data == demo_paths(REPO / "mergesearch-demo").data["reverse"].resolve()


def test_bad_inputs(tmp_path) -> None:
    from mergesearch.errors import DataError, MergeSearchError

    (tmp_path / "file").write_text("x")
    with pytest.raises(MergeSearchError, match="not a directory"):
        build_demo(tmp_path / "file", recipe=TINY)
    with pytest.raises(DataError, match="'valid'"):
        tradeoff_table(tmp_path, "valid")
