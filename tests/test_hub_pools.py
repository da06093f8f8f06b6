"""Hub model references (``hf://<org>/<name>[@<revision>]``) and the two pool configs that name FusionBench's
public checkpoints (issue #20 item 4), all offline: no test reaches a hub.

- the hub pools compose, every expert is a hub reference, CLIP's classes and templates are FusionBench's;
- without ``pool.data_dir``, and with the hub off and an empty HF cache, train.py stops at once with one line
  naming the key (or the repo and the fix), having written nothing;
- a pool whose base and an expert are served from a fake HF cache (``HF_HUB_CACHE`` of the subprocess only)
  runs through train.py to an export whose model card names the references;
- the hub on: every reference is checked before anything is downloaded (hub answers patched), and a hub
  that cannot be reached (a closed local port) falls back to the cache or names the repo.
"""

from __future__ import annotations

import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import helpers
from adamerge.errors import DataError, PoolError
from adamerge.pool import hub

COMMIT = "0123456789abcdef0123456789abcdef01234567"
ORG = "adamerge-test"
CLIP_CLASSES = {"sun397": 397, "stanford-cars": 196, "resisc45": 45, "eurosat": 10, "svhn": 10, "gtsrb": 43,
                "mnist": 10, "dtd": 47}
GLUE = ["cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb"]


def cached_repo(cache: Path, repo_id: str, model_dir: Path | None = None, commit: str = COMMIT) -> Path:
    """``repo_id`` as the HF cache holds it: ``refs/main`` naming ``commit``, ``snapshots/<commit>/`` the files."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    if model_dir is not None:
        shutil.copytree(model_dir, snap)
    else:
        snap.mkdir(parents=True)
        (snap / "config.json").write_text("{}")
    return snap


def one_line_error(proc, pattern: str) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr[-3000:]
    assert re.search(pattern, proc.stderr), proc.stderr
    return proc.stderr


def wrote_nothing(out: Path) -> None:
    """Hydra's empty train.log at most: no .hydra/, checkpoints or export."""
    left = {p.name: p.stat().st_size for p in out.iterdir()} if out.exists() else {}
    assert left in ({}, {"train.log": 0}), left


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every train.py run of this file, two at a time (interpreter start-up dominates): {name: (proc, out_dir)}."""
    tmp = tmp_path_factory.mktemp("hub")
    empty = {"HF_HUB_CACHE": str(tmp / "empty_cache"), "HF_HOME": str(tmp / "empty_home"), "HF_HUB_OFFLINE": "1"}
    pool = helpers.make_pool(tmp / "models", k=2, n_cal=8, n_test=8)
    cache = tmp / "hf_home" / "hub"
    cached_repo(cache, f"{ORG}/tiny-base", Path(pool["base"]))
    cached_repo(cache, f"{ORG}/tiny-task0", Path(pool["tasks"]["task0"]["expert"]))
    pool["base"] = f"hf://{ORG}/tiny-base"
    pool["tasks"]["task0"]["expert"] = f"hf://{ORG}/tiny-task0@{COMMIT}"  # a revision: the commit itself
    conf = tmp / "conf"
    helpers.write_pool_config(conf, "hubtiny", pool)
    fake = {"HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp / "hf_home"), "HF_HUB_OFFLINE": "1"}
    jobs = {
        "clip_no_data_dir": (["pool=clip_vit_b32_ta8"], {}),
        "clip_offline": (["pool=clip_vit_b32_ta8", f"pool.data_dir={tmp / 'x'}"], empty),
        "t5_offline": (["pool=flan_t5_base_glue", f"pool.data_dir={tmp / 'x'}"], empty),
        "fake_cache": (["--config-dir", str(conf), "pool=hubtiny", "evaluate.reference_rows=false",
                        "export.task_models=false"], fake),
    }

    def run(name):
        args, env = jobs[name]
        out = tmp / "runs" / name
        return helpers.run_train([*args, "method=task_arithmetic", f"out_dir={out}"], env=env, check=False,
                                 timeout=300), out

    with ThreadPoolExecutor(max_workers=2) as pool_of_runs:
        return dict(zip(jobs, pool_of_runs.map(run, jobs)))


def test_hub_pool_without_data_dir_names_the_key(runs):
    proc, out = runs["clip_no_data_dir"]
    one_line_error(proc, r"^error: config key 'pool.data_dir' is not set \('\?\?\?' in the pool=clip_vit_b32_ta8 "
                         r"config\); give it on the command line: pool.data_dir=<value>\n$")
    wrote_nothing(out)


@pytest.mark.parametrize("name, base, expert", [
    ("clip_offline", "openai/clip-vit-base-patch32", "tanganke/clip-vit-base-patch32_sun397"),
    ("t5_offline", "google/flan-t5-base", "tanganke/flan-t5-base_glue-cola"),
])
def test_hub_pool_offline_with_an_empty_cache_is_one_line_before_any_work(runs, name, base, expert):
    proc, out = runs[name]
    err = one_line_error(proc, rf"^error: pool.base: hub model hf://{base} is not in the local Hugging Face cache "
                               r"\(.*empty_cache\) and the hub is off \(HF_HUB_OFFLINE=1.*export HF_HUB_OFFLINE=0 "
                               r"with a hub connection to download it, or set pool.base to a local copy")
    assert "8 more hub references of this pool fail too" in err and "pool.tasks." in err
    assert expert not in err  # the first is named in full, the others by their key
    wrote_nothing(out)


def test_hub_pool_configs_compose_with_fusionbench_tasks_and_classes(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from adamerge.pool.config import pool_from_config

    clip = OmegaConf.to_container(helpers.compose(["pool=clip_vit_b32_ta8", "pool.data_dir=/data"]), resolve=True)
    pool = clip["pool"]
    assert pool["base"] == "hf://openai/clip-vit-base-patch32" and pool["model_class"] == "clip_zero_shot"
    assert {t: len(s["classes"]) for t, s in pool["tasks"].items()} == CLIP_CLASSES
    for task, spec in pool["tasks"].items():
        assert spec["expert"] == f"hf://tanganke/clip-vit-base-patch32_{task}"
        assert len(set(spec["classes"])) == len(spec["classes"])
        assert spec["templates"] and all(t.count("{}") == 1 and t.format("x") for t in spec["templates"])
        assert spec["calibration"] == f"/data/{task}/calibration" and spec["test"] == f"/data/{task}/test.jsonl"
    assert pool["tasks"]["eurosat"]["templates"][0] == "a centered satellite photo of {}."
    t5 = OmegaConf.to_container(helpers.compose(["pool=flan_t5_base_glue", "pool.data_dir=/data"]), resolve=True)["pool"]
    assert t5["base"] == "hf://google/flan-t5-base" and t5["model_class"] == "seq2seq_lm" and list(t5["tasks"]) == GLUE
    for task, spec in t5["tasks"].items():
        assert spec["expert"] == f"hf://tanganke/flan-t5-base_glue-{task}"  # full fine-tunes, not *_lora-16
        assert spec["test"] == f"/data/{task}/test.jsonl"
    assert t5["tasks"]["mnli"]["classes"] == ["entailment", "neutral", "contradiction"]
    assert t5["tasks"]["mrpc"]["classes"] == ["no", "yes"]  # strings, not YAML 1.1 booleans
    assert "classes" not in t5["tasks"]["stsb"]  # regression: first-token exact match
    # every key (data_dir included) and every class list and template passes the pool's checks: what stops
    # them here is the first hub reference, not in this empty cache
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    for cfg, base in ((pool, "openai/clip-vit-base-patch32"), (t5, "google/flan-t5-base")):
        with pytest.raises(PoolError, match=rf"^pool.base: hub model hf://{base} is not in the local"):
            pool_from_config(cfg)


def test_a_pool_served_from_the_local_hf_cache_runs_offline(runs):
    proc, out = runs["fake_cache"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"/models--{ORG}--tiny-base/snapshots/{COMMIT}" in proc.stdout + proc.stderr  # the run's header
    assert (out / "export" / "model" / "config.json").is_file()
    card = (out / "export" / "README.md").read_text()
    assert f"Base model: `hf://{ORG}/tiny-base (commit {COMMIT})`" in card
    assert f"| task0 | `hf://{ORG}/tiny-task0@{COMMIT} (commit {COMMIT})` |" in card
    assert f"| task1 | `{out.parent.parent / 'models' / 'task1'}` |" in card  # a local path, as given
    from huggingface_hub import ModelCard

    assert ModelCard.load(out / "export" / "README.md").data.base_model == f"{ORG}/tiny-base"  # the Hub's metadata


@pytest.fixture
def hub_on(tmp_path, monkeypatch):
    return switch_hub_on(tmp_path, monkeypatch)


def switch_hub_on(tmp_path, monkeypatch):
    """The hub on, its endpoint a closed local port (nothing leaves this machine), the cache in tmp."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    return tmp_path / "cache"


def test_unreachable_hub_falls_back_to_the_cache_or_names_the_repo(hub_on):
    snap = cached_repo(hub_on, f"{ORG}/cached")
    refs = hub.resolve({"pool.base": f"hf://{ORG}/cached", "pool.tasks.a.expert": "/local/dir"})
    assert list(refs) == ["pool.base"] and refs["pool.base"].path == str(snap)
    with pytest.raises(PoolError, match=rf"^pool.tasks.b.expert: hub model hf://{ORG}/absent cannot be downloaded: "
                                        r"the hub cannot be reached \(ConnectError.*\) and the model is not in the "
                                        r"local Hugging Face cache .*or set pool.tasks.b.expert to a local copy"):
        hub.resolve({"pool.base": f"hf://{ORG}/cached", "pool.tasks.b.expert": f"hf://{ORG}/absent"})


def test_every_reference_and_data_path_is_checked_before_any_download(hub_on, tmp_path, monkeypatch):
    """A wrong repo in the last expert, or a wrong data path, is named before the first download."""
    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    from adamerge.pool.config import pool_from_config

    def model_info(self, repo_id, revision=None, timeout=None):
        if repo_id.endswith("typo"):
            response = httpx2.Response(404, request=httpx2.Request("GET", f"http://127.0.0.1:9/{repo_id}"))
            raise RepositoryNotFoundError("404", response=response)
        return type("Info", (), {"sha": COMMIT})()

    downloads = []

    def download(repo_id, **kwargs):
        if kwargs.get("local_files_only"):
            return hub_snapshot(repo_id, **kwargs)
        if not allow_downloads:
            raise AssertionError(f"downloaded {repo_id} before every reference was checked")
        downloads.append((repo_id, kwargs["revision"]))
        return f"/snapshots/{repo_id}"

    import huggingface_hub

    hub_snapshot, allow_downloads = huggingface_hub.snapshot_download, False
    monkeypatch.setattr(HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    data = helpers.write_jsonl(tmp_path / "cal.jsonl", [("a text", 0)])
    cfg = {"base": f"hf://{ORG}/base", "tasks": {"a": {"expert": f"hf://{ORG}/a", "calibration": data},
                                                 "b": {"expert": f"hf://{ORG}/typo", "calibration": data}}}
    with pytest.raises(PoolError, match=rf"^pool.tasks.b.expert: hub model {ORG}/typo does not exist on the hub"):
        pool_from_config(cfg)
    cfg["tasks"]["b"] = {"expert": f"hf://{ORG}/b", "calibration": str(tmp_path / "missing.jsonl")}
    with pytest.raises(DataError, match=r"task 'b': calibration path .*missing.jsonl does not exist; fix the path "
                                        r"under pool tasks.b.calibration \(checked before the pool's hub models"):
        pool_from_config(cfg)
    allow_downloads, order = True, []  # all found and the data there: downloaded, the revision as written
    refs = hub.resolve({"pool.base": f"hf://{ORG}/base", "pool.tasks.a.expert": f"hf://{ORG}/a@v1"},
                       before_download=lambda: order.append(list(downloads)))
    assert order == [[]] and downloads == [(f"{ORG}/base", None), (f"{ORG}/a", "v1")]
    assert refs["pool.tasks.a.expert"].path == f"/snapshots/{ORG}/a"


@pytest.mark.parametrize("value, why", [
    (f"hf://{ORG}/a/b", "Repo id must be in the form"),
    (f"hf://{ORG}/name@", "no revision after '@'"),
    ("hf://", "Repo id must"),
])
def test_a_malformed_reference_names_its_key(value, why):
    with pytest.raises(PoolError, match=rf"^pool.tasks.t.expert: '{re.escape(value)}' is not a hub model reference "
                                        rf"\({why}.*write hf://<org>/<name> or hf://<org>/<name>@<revision>"):
        hub.resolve({"pool.base": "/a/dir", "pool.tasks.t.expert": value})


def test_frank_wolfe_candidates_may_be_hub_references(hub_on):
    """method.candidates takes hf:// references as the pool does: resolved from the cache when the hub is out of
    reach, named after the repo; one that cannot be found is named by its key."""
    from adamerge.pool.candidates import candidate_paths

    snap = cached_repo(hub_on, f"{ORG}/cand")
    assert candidate_paths([f"hf://{ORG}/cand", "/local/cand"]) == {"cand": snap, "cand_2": Path("/local/cand")}
    assert candidate_paths({"mine": f"hf://{ORG}/cand"}) == {"mine": snap}
    with pytest.raises(PoolError, match=rf"^method.candidates\[1\]: hub model hf://{ORG}/absent cannot be downloaded"):
        candidate_paths(["/local/a", f"hf://{ORG}/absent"])


@pytest.mark.parametrize("case", ["hub off", "hub unreachable", "not a repo id"])
def test_push_to_hub_is_refused_before_any_work(tiny_pool_cfg, tmp_path, monkeypatch, capsys, case):
    """export.push_to_hub needs the hub: offline (adamerge's default), unreachable or a malformed name is one line
    before the pool loads, and nothing is trained or exported."""
    if case == "hub unreachable":
        switch_hub_on(tmp_path, monkeypatch)
    repo = "not a repo!" if case == "not a repo id" else f"{ORG}/merged"
    out = tmp_path / "run"
    code = helpers.run_inprocess([f"out_dir={out}", "method=adamerging_layerwise", f"export.push_to_hub='{repo}'"],
                                 tiny_pool_cfg)
    want = {"hub off": r"the hub is off \(HF_HUB_OFFLINE=1, adamerge's default\); export HF_HUB_OFFLINE=0",
            "hub unreachable": r"cannot upload: .*; check the hub connection and log in",
            "not a repo id": r"not a hub repo id"}[case]
    helpers.assert_refused_in_one_line(code, capsys, rf"export.push_to_hub={re.escape(repo)}: {want}", out)
    assert not (out / "checkpoints").exists() and not (out / "export").exists()


def test_push_to_hub_hands_the_export_to_huggingface_hub(tiny_pool_cfg, tmp_path, monkeypatch, capsys):
    """The wiring only (no hub here): after the export, create_repo and upload_folder get the repo and the export
    directory. The checks before the run pass for a logged-in user with the hub on."""
    from huggingface_hub import HfApi, constants

    calls = []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "whoami", lambda self, *a, **k: {"name": "me"})
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **k: calls.append(("create", repo_id, k)))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **k: calls.append(("upload", k["repo_id"], k)))
    out = tmp_path / "run"
    helpers.train_here(tiny_pool_cfg, out, "method=task_arithmetic", "evaluate.enabled=false",
                       f"export.push_to_hub={ORG}/merged")
    assert [c[:2] for c in calls] == [("create", f"{ORG}/merged"), ("upload", f"{ORG}/merged")]
    assert calls[1][2]["folder_path"] == str(out / "export") and (out / "export" / "model").is_dir()
    assert f"uploaded the export to https://huggingface.co/{ORG}/merged" in capsys.readouterr().out
