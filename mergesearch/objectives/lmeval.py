"""Any lm-evaluation-harness task, run through its Python API on the resident model (optional extra).

``pip install mergesearch[lm-eval]``. Options: ``task`` (a registered task or one defined in ``include_path``,
a folder of task YAMLs that may point to local data files), ``metric`` (e.g. ``acc``, ``acc_norm`` or
``exact_match,strict-match``), ``num_fewshot``. The common ``limit`` and ``seed`` choose a seeded random subset
of the task's evaluation documents, as for every objective (not lm-eval's ``--limit``, which takes the first
documents), so fidelity rungs score random prefixes of it; ``seed`` also seeds the few-shot sampler; ``split``
is not used (lm-eval picks the task's evaluation split). A single task is scored per document (lm-eval's
``samples``) and aggregated by the task's own aggregation; a group of tasks is scored whole.

Local paths in a task YAML (``dataset_kwargs.data_files``, ``dataset_kwargs.data_dir``, a ``dataset_path`` naming
a local folder or file) are relative to that YAML's folder, as ``!function`` references and ``include`` are:
lm-eval and ``datasets`` would resolve them against the working directory, so a job would work from one folder
only. :func:`resolved_task_dir` mirrors ``include_path`` with those paths made absolute before lm-eval reads it
(``data_files`` only where ``dataset_path`` is a file builder such as ``json``: for a hub dataset they name files
in its repository). A relative data file that matches nothing is one line naming the YAML and the file.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import Field as PydField

from mergesearch.errors import ConfigError, DataError, TrialError
from mergesearch.objectives.base import ObjectiveBase, ObjectiveContext, Params

if TYPE_CHECKING:
    from mergesearch.config import ObjectiveConfig


class LmEvalParams(Params):
    task: str
    include_path: Path | None = None
    metric: str = "acc"
    num_fewshot: int | None = PydField(default=None, ge=0)


class LmEval(ObjectiveBase):
    """One lm-eval task's metric; the task (and its dataset) is loaded once, at build time."""

    Params = LmEvalParams

    def __init__(self, config: ObjectiveConfig, context: ObjectiveContext) -> None:
        super().__init__(config, context)
        try:
            from lm_eval.tasks import TaskManager, get_task_dict
        except ImportError:
            raise ConfigError(
                f"objective '{self.name}': lm-eval is not installed (pip install mergesearch[lm-eval])"
            ) from None
        p = self.params
        if p.include_path is not None and not p.include_path.is_dir():
            raise ConfigError(f"objective '{self.name}': include_path {p.include_path} is not a folder")
        with resolved_task_dir(p.include_path) as (include, missing):
            manager = None
            # Indexing lm-eval's thousands of built-in task YAMLs takes ~10-30 s: look in include_path alone first.
            for defaults in ([False, True] if include else [True]):
                manager = TaskManager(include_path=include and str(include), include_defaults=defaults,
                                      verbosity="ERROR")
                if p.task in manager.all_tasks:
                    break
            else:
                raise ConfigError(f"objective '{self.name}': unknown lm-eval task '{p.task}'")
            try:
                # builds the tasks and loads their datasets now (!function references resolved too): the mirror
                # is not read again once this returns
                self.task_dict = get_task_dict([p.task], manager)
            except Exception as e:  # a local data file not found; the task's dataset from the hub: offline, refused
                gone = _missing_in(e, missing)
                if gone is not None:
                    raise DataError(f"objective '{self.name}': lm-eval task YAML {gone.yaml}: data file "
                                    f"'{gone.value}' not found (looked for {gone.looked})") from None
                from mergesearch.models import hub_reply

                raise DataError(f"objective '{self.name}': lm-eval task '{p.task}' could not load its data: "
                                f"{hub_reply(e)}") from None
        for task in self.task_dict.values():
            if p.num_fewshot is not None:
                task.set_config(key="num_fewshot", value=p.num_fewshot)
        self.metric = p.metric if "," in p.metric else f"{p.metric},none"
        self._model: Any = None
        self._lm: Any = None
        task = self.task_dict.get(p.task)
        #: a single task's documents, as indices into its evaluation split in the seeded order of ``limit``'s
        #: subset (a group of tasks is scored whole: :meth:`size` is then 0)
        self.docs: list[int] = []
        if task is not None and hasattr(task, "eval_docs"):
            from mergesearch.objectives.data import subset

            self.docs = subset(len(task.eval_docs), config.limit, config.seed)

    def size(self) -> int:
        return len(self.docs)

    def _reseed(self) -> None:
        """Restart the few-shot sampler: lm-eval's generator advances with every document, so without this each
        trial would see other few-shot examples (noise between candidates). With it, every trial scored in the
        same stages sees the same contexts (a document's context still depends on the stage it is scored in)."""
        for task in self.task_dict.values():
            task.set_fewshot_seed(seed=self.config.seed)

    def _wrapper(self, model: Any, tokenizer: Any) -> Any:
        from lm_eval.models.huggingface import HFLM

        if self._model is not model:  # the resident model is merged in place: one wrapper per worker
            self._lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.config.batch_size)
            self._model = model
        return self._lm

    def _no_metric(self, known: Any) -> TrialError:
        return TrialError(f"objective '{self.name}': no metric '{self.metric}' (task reports: {', '.join(known)})")

    def score(self, model: Any, tokenizer: Any, start: int = 0, stop: int | None = None) -> list[dict[str, Any]]:
        """lm-eval's per-document metric values for documents ``[start, stop)`` of :attr:`docs`."""
        from lm_eval.evaluator import evaluate

        docs = self.docs[start:stop]
        if not docs:
            return []
        self._reseed()
        out = evaluate(lm=self._wrapper(model, tokenizer), task_dict=self.task_dict,
                       samples={self.params.task: sorted(docs)}, bootstrap_iters=0, log_samples=True,
                       verbosity="ERROR")
        metric, filt = self.metric.split(",", 1)
        rows = [r for r in out["samples"][self.params.task] if r.get("filter") == filt]
        if rows and metric not in rows[0]:
            raise self._no_metric(k for k in out["results"][self.params.task] if "," in k and "_stderr" not in k)
        # sorted: lm-eval reads the selected documents in the split's order and labels the j-th with samples[j]
        by_doc = {int(r["doc_id"]): r[metric] for r in rows}
        return [{"doc": d, "value": by_doc[d]} for d in docs]

    def reduce(self, records: list[dict[str, Any]]) -> float:
        """The task's own aggregation of the per-document values (a mean for ``acc``; not for perplexities)."""
        metric = self.metric.split(",", 1)[0]
        aggregate = self.task_dict[self.params.task].aggregation()[metric]
        return float(aggregate([r["value"] for r in records]))

    def __call__(self, model: Any, tokenizer: Any) -> float:
        if self.docs:
            return super().__call__(model, tokenizer)
        from lm_eval.evaluator import evaluate

        self._reseed()
        out = evaluate(lm=self._wrapper(model, tokenizer), task_dict=self.task_dict, limit=self.config.limit,
                       bootstrap_iters=0, log_samples=False, verbosity="ERROR")
        results = out["results"][self.params.task]
        if self.metric not in results:
            raise self._no_metric(k for k in results if "," in k and "_stderr" not in k)
        return float(results[self.metric])


@dataclass(frozen=True)
class MissingFile:
    """A relative data path of a task YAML that matches nothing next to it."""

    #: the (original) task YAML that names it
    yaml: Path
    #: the value as written in the YAML
    value: str
    #: the absolute path (or glob pattern) looked for
    looked: Path


class _Function(str):
    """An lm-eval ``!function module.name`` reference, kept as written through a load and dump."""


class _Loader(yaml.SafeLoader):
    """lm-eval's YAML dialect: plain YAML plus ``!function`` (kept unresolved)."""


class _Dumper(yaml.SafeDumper):
    """Writes ``_Function`` back as ``!function``."""


_Loader.add_constructor("!function", lambda loader, node: _Function(loader.construct_scalar(node)))
_Dumper.add_representer(_Function, lambda dumper, value: dumper.represent_scalar("!function", str(value)))

_YAML_SUFFIXES = (".yaml", ".yml")
_GLOB_CHARS = frozenset("*?[")
#: ``datasets``' builders for local files (a ``dataset_path`` of one of these reads ``data_files``/``data_dir``
#: from disk; with any other value they name files inside a hub repository or a local dataset folder)
FILE_BUILDERS = frozenset({"json", "csv", "parquet", "text", "arrow", "pandas", "xml", "sql", "webdataset",
                           "imagefolder", "audiofolder", "videofolder", "hdf5"})


def _load(path: Path) -> dict[str, Any] | None:
    """A YAML file as lm-eval reads it (``!function`` unresolved); None when it does not parse to a mapping."""
    try:
        cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # _Loader is a SafeLoader
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    return cfg if isinstance(cfg, dict) else None


def _includes(cfg: dict[str, Any]) -> list[Any]:
    inc = cfg.get("include")
    return inc if isinstance(inc, list) else [] if inc is None else [inc]


def _inherited(path: Path, key: str, seen: frozenset[Path] = frozenset()) -> Any:
    """``key`` of the YAML at ``path`` after its includes (lm-eval's rule: its own value, else the last include's
    that has one); None when unset or unreadable."""
    cfg = _load(path) if path not in seen else None
    if cfg is None:
        return None
    if key in cfg:
        return cfg[key]
    found = None
    for inc in _includes(cfg):
        if isinstance(inc, str):
            value = _inherited((path.parent / os.path.expanduser(inc)).resolve(), key, seen | {path})
            found = value if value is not None else found
    return found


def _is_relative(value: Any) -> bool:
    """Whether ``value`` is a relative local path (not absolute, not ``~``-based, not a URL such as ``hf://``)."""
    return isinstance(value, str) and bool(value) and "://" not in value \
        and not os.path.isabs(os.path.expanduser(value))


def _exists(path: Path) -> bool:
    """Whether a file or folder (or, for a glob pattern, anything) is at ``path``."""
    text = str(path)
    return bool(glob.glob(text, recursive=True)) if _GLOB_CHARS & set(text) else path.exists()


class _Rewriter:
    """Makes one task YAML's local paths absolute against its folder (see the module docstring)."""

    def __init__(self, yaml_path: Path, root: Path) -> None:
        self.yaml_path = yaml_path
        self.folder = yaml_path.parent
        self.root = root
        self.changed = False
        self.missing: list[MissingFile] = []

    def _path(self, value: str, base: Path, strict: bool, rewrite: bool = True) -> str:
        """``value`` made absolute against ``base`` (when ``rewrite``). ``strict``: the dataset is known to read
        local files, so a path that matches nothing is recorded as missing; otherwise (the dataset type is set by
        another file) only a path that exists is rewritten."""
        looked = base.resolve() / value if _GLOB_CHARS & set(value) else (base / value).resolve()
        if not _exists(looked):
            if not strict:
                return value
            self.missing.append(MissingFile(self.yaml_path, value, looked))
        if not rewrite:
            return value
        self.changed = True
        return str(looked)

    def _files(self, files: Any, base: Path, strict: bool, rewrite: bool) -> Any:
        """``data_files`` in any of its shapes (a path, a list, a mapping of split to path or list)."""
        if isinstance(files, dict):
            return {k: self._files(v, base, strict, rewrite) for k, v in files.items()}
        if isinstance(files, list):
            return [self._files(v, base, strict, rewrite) for v in files]
        return self._path(files, base, strict, rewrite) if _is_relative(files) else files

    def _dataset_kwargs(self, kwargs: dict[str, Any], strict: bool) -> dict[str, Any]:
        out = dict(kwargs)
        if _is_relative(out.get("data_dir")):
            out["data_dir"] = self._path(out["data_dir"], self.folder, strict)
        if "data_files" in out:
            data_dir = out.get("data_dir")
            if isinstance(data_dir, str) and not _is_relative(data_dir):
                # datasets joins data_files to data_dir: checked there, left as written
                self._files(out["data_files"], Path(os.path.expanduser(data_dir)), strict, rewrite=False)
            elif data_dir is None:
                out["data_files"] = self._files(out["data_files"], self.folder, strict, rewrite=True)
        return out

    def node(self, value: Any, dataset_path: Any) -> Any:
        """``value`` with its ``dataset_kwargs`` and local ``dataset_path`` rewritten, group task lists included;
        ``dataset_path``: the one in force (from the enclosing mapping or the includes)."""
        if isinstance(value, list):
            return [self.node(v, dataset_path) for v in value]
        if not isinstance(value, dict):
            return value
        dataset_path = value.get("dataset_path", dataset_path)
        out = {k: self.node(v, dataset_path) for k, v in value.items()}
        own = value.get("dataset_path")
        if _is_relative(own) and own not in FILE_BUILDERS and (self.folder / own).exists():
            out["dataset_path"] = self._path(own, self.folder, strict=False)  # a local dataset folder or script
        kwargs = out.get("dataset_kwargs")
        if isinstance(kwargs, dict) and (dataset_path is None or dataset_path in FILE_BUILDERS):
            out["dataset_kwargs"] = self._dataset_kwargs(kwargs, strict=dataset_path is not None)
        return out

    def includes(self, value: Any) -> Any:
        """``include`` entries: relative ones pointing outside the mirrored folder made absolute."""
        if isinstance(value, list):
            return [self.includes(v) for v in value]
        if _is_relative(value):
            target = (self.folder / value).resolve()
            if not target.is_relative_to(self.root):
                self.changed = True
                return str(target)
        return value


def _rewrite(yaml_path: Path, root: Path) -> tuple[str | None, list[MissingFile]]:
    """The text of ``yaml_path`` with its local paths made absolute (None when nothing changes or it does not
    parse: lm-eval then reads it as it is, and reports what it makes of it), and its missing data files."""
    cfg = _load(yaml_path)
    if cfg is None:
        return None, []
    rw = _Rewriter(yaml_path, root)
    cfg = rw.node(cfg, _inherited(yaml_path, "dataset_path"))  # a template may set it for this file
    if "include" in cfg:
        cfg["include"] = rw.includes(cfg["include"])
    text = yaml.dump(cfg, Dumper=_Dumper, sort_keys=False, allow_unicode=True) if rw.changed else None
    return text, rw.missing


@contextmanager
def resolved_task_dir(include_path: Path | None) -> Iterator[tuple[Path | None, list[MissingFile]]]:
    """``include_path`` with every task YAML's local paths absolute against that YAML's folder, for as long as
    the context lasts; and the relative data files that match nothing (lm-eval fails on them when it loads
    the task that names them; :func:`_missing_in` finds which one it was).

    When no YAML needs it, ``include_path`` itself. Otherwise a temporary mirror of it: every YAML copied (and
    rewritten where needed: a symlinked YAML would be read from its original folder, includes and all), every
    other file a symlink to the original (``!function`` modules load from where they are).
    """
    if include_path is None:
        yield None, []
        return
    root = include_path.resolve()
    rewritten: dict[Path, str] = {}
    missing: list[MissingFile] = []
    yamls = sorted(p for p in root.rglob("*") if p.suffix in _YAML_SUFFIXES and p.is_file())
    for path in yamls:
        text, gone = _rewrite(path, root)
        missing += gone
        if text is not None:
            rewritten[path.relative_to(root)] = text
    if not rewritten:
        yield include_path, missing
        return
    with tempfile.TemporaryDirectory(prefix="mergesearch-lmeval-") as tmp:
        mirror = Path(tmp) / root.name
        for folder, _, files in os.walk(root, followlinks=True):
            rel = Path(folder).relative_to(root)
            (mirror / rel).mkdir(parents=True, exist_ok=True)
            for name in files:
                src, dst = Path(folder) / name, mirror / rel / name
                if rel / name in rewritten:
                    dst.write_text(rewritten[rel / name], encoding="utf-8")
                elif dst.suffix in _YAML_SUFFIXES:
                    shutil.copyfile(src, dst)
                else:
                    dst.symlink_to(src.resolve())
        yield mirror, missing


def _missing_in(error: BaseException, missing: list[MissingFile]) -> MissingFile | None:
    """The missing data file an lm-eval/datasets error is about (its message names the path looked for)."""
    texts = []
    e: BaseException | None = error
    while e is not None and len(texts) < 10:
        texts.append(str(e))
        e = e.__cause__ or e.__context__
    for m in missing:
        if any(str(m.looked) in t for t in texts):
            return m
    return None
