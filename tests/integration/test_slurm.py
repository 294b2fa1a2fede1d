"""The real DAG on a real (one-node) SLURM cluster, through a `--profile`, compared with a local run.

tests/cluster/start_slurm.sh starts slurmctld, slurmd and munged from the Debian packages (installing them
when missing) with one fake GPU, so that `extract_activations` (resources: gpu=1) is scheduled; the module
fixture always stops them again. The test runs model acquisition, corpus preparation and extraction of the
SmolLM2 store with config/ci.yaml through tests/cluster/profile, proves that the extraction ran as a SLURM
job (job completion log, squeue, the plugin's per-job log, the store's `slurm_job_id`), then runs the same
targets locally in a second working directory and checks that both stores hold identical arrays.
Needs root, and apt-get or an installed SLURM; ~2-3 minutes on 2 cores once the packages are installed.
"""

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "tests" / "cluster"
PROFILE = CLUSTER / "profile"
STORE = "results/activations/smollm2-135m/registers.h5"
RUN_TIMEOUT = 300  # seconds per snakemake run; `timeout -k 15` kills it (and the plugin then cancels its jobs)
PLUGIN = "snakemake-executor-plugin-slurm"


def _why_not_here() -> str | None:
    """Why SLURM cannot be started on this machine, or None."""
    if not sys.platform.startswith("linux"):
        return "SLURM test runs on Linux only"
    if os.geteuid() != 0:
        return "needs root: tests/cluster/start_slurm.sh installs packages and starts slurmctld/slurmd/munged"
    installed = shutil.which("slurmctld") or Path("/usr/sbin/slurmctld").exists()
    if not installed and not shutil.which("apt-get"):
        return "SLURM is not installed and apt-get is not available to install it"
    if not shutil.which("timeout"):
        return "needs coreutils `timeout`"
    return None


WHY_NOT = _why_not_here()
pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")]


def _show(config: pytest.Config, text: str) -> None:
    """Print evidence to the terminal, whether or not pytest captures output (as ``capsys.disabled()`` does)."""
    capture = config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        sys.stderr.write(text.rstrip() + "\n")
        sys.stderr.flush()


def _run(command: list[str], timeout: int, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)


@pytest.fixture(scope="module")
def slurm_cluster(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory):
    """A running one-node SLURM cluster (its run directory); every daemon it started is stopped afterwards."""
    run_dir = tmp_path_factory.mktemp("slurm")
    started = time.monotonic()
    try:
        start = _run(["bash", str(CLUSTER / "start_slurm.sh"), str(run_dir)], timeout=900)
        _show(pytestconfig, f"--- start_slurm.sh ({time.monotonic() - started:.0f} s, exit {start.returncode})\n"
              f"{start.stdout}{start.stderr}")  # fmt: skip
        if start.returncode in (2, 3):  # not root / no apt-get; packages could not be installed (offline)
            pytest.skip(f"SLURM could not be started: {start.stderr.strip().splitlines()[-1:]}")
        assert start.returncode == 0, start.stdout + start.stderr
        yield run_dir
    finally:
        stop = _run(["bash", str(CLUSTER / "stop_slurm.sh"), str(run_dir)], timeout=120)
        _show(pytestconfig, f"--- stop_slurm.sh (exit {stop.returncode})\n{stop.stdout}{stop.stderr}")


@pytest.fixture(scope="module")
def slurm_plugin(pytestconfig: pytest.Config) -> str:
    """The version of the SLURM executor plugin, installed into this environment when missing."""
    probe = [sys.executable, "-c", f"from importlib.metadata import version; print(version({PLUGIN!r}))"]
    found = _run(probe, timeout=60)
    if found.returncode != 0:
        install = _run([sys.executable, "-m", "pip", "install", "--quiet", PLUGIN], timeout=600)
        if install.returncode != 0:
            pytest.skip(f"could not install {PLUGIN}: {(install.stdout + install.stderr)[-500:]}")
        found = _run(probe, timeout=60)
        assert found.returncode == 0, found.stderr
        _show(pytestconfig, f"--- installed {PLUGIN} {found.stdout.strip()}")
    return found.stdout.strip()


def _workdir(root: Path) -> Path:
    """A working directory that sees the repo's config/ and reuses its downloads in resources/."""
    (root / "config").symlink_to(REPO / "config")
    (root / "overlay.yaml").write_text(yaml.safe_dump({"paths": {"resources": str(REPO / "resources")}}))
    return root


def _snakemake(root: Path, *extra: str) -> tuple[subprocess.CompletedProcess, float]:
    """Run the SmolLM2 store's part of the DAG (acquire, prepare, extract) with config/ci.yaml in ``root``."""
    command = [
        "timeout", "-k", "15", str(RUN_TIMEOUT),
        sys.executable, "-m", "snakemake",
        "--snakefile", str(REPO / "workflow" / "Snakefile"),
        "--directory", str(root),
        "--configfile", "config/config.yaml", "config/ci.yaml", "overlay.yaml",
        *extra,
        "--", STORE,
    ]  # fmt: skip
    started = time.monotonic()
    # No SLURM_* from an outer job (a CI runner that is itself a SLURM job): only SLURM's own job may set them.
    env = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
    result = _run(command, timeout=RUN_TIMEOUT + 60, cwd=root, env=env | {"PYTHONUNBUFFERED": "1"})
    return result, time.monotonic() - started


def _jobcomp(run_dir: Path) -> list[dict[str, str]]:
    """The job completion log (jobcomp/filetxt): one dict of its KEY=VALUE fields per finished job."""
    path = run_dir / "jobcomp.log"
    lines = path.read_text().splitlines() if path.exists() else []
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in lines if line.strip()]


def _store_arrays(path: Path) -> dict[str, np.ndarray]:
    from latent_atlas.store import ActivationStore

    with ActivationStore(path) as store:
        arrays = {address: store.read(address, dtype=store.stored_dtype(address)) for address in store.addresses}
        tokens = store.tokens()
        for column in ("token_id", "doc", "pos"):
            arrays[f"tokens.{column}"] = tokens[column].to_numpy()
        docs = store.docs()
        for column in docs.columns:
            arrays[f"docs.{column}"] = docs[column].to_numpy()
        arrays["layers"] = np.asarray(store.layers)
        return arrays


def test_extraction_runs_as_a_slurm_job_and_matches_a_local_run(
    slurm_plugin, slurm_cluster, tmp_path_factory, pytestconfig
):
    run_dir = slurm_cluster
    root = _workdir(tmp_path_factory.mktemp("slurm-run"))
    result, seconds = _snakemake(root, "--profile", str(PROFILE), "--workflow-profile", "none")
    log_tail = f"\n--- snakemake stdout\n{result.stdout[-6000:]}\n--- snakemake stderr\n{result.stderr[-8000:]}"
    assert result.returncode == 0, f"SLURM run failed (exit {result.returncode}, {seconds:.0f} s){log_tail}"

    # 1. SLURM's own record: the job completion log and squeue (MinJobAge keeps finished jobs listed).
    jobs = _jobcomp(run_dir)
    fields = "JobID:|,Name:|,State:|,tres-per-job:|,NodeList:|,Comment:"  # tres-per-job: what --gpus asked for
    queue = _run(["squeue", "--states=all", "-h", "-O", fields], timeout=30).stdout
    by_id = {line.split("|")[0]: line.split("|") for line in queue.splitlines() if line.strip()}
    # 2. The plugin's per-job logs: .snakemake/slurm_logs/rule_<rule>/<wildcards>/<jobid>.log
    slurm_logs = sorted((root / ".snakemake" / "slurm_logs").rglob("*.log"))
    # 3. The job id the extraction job saw (SLURM_JOB_ID), recorded in the store's provenance.
    from latent_atlas.store import ActivationStore

    with ActivationStore(root / STORE) as store:
        attrs = store.attrs
    job_id = str(attrs.get("slurm_job_id"))
    evidence = "\n".join(
        [
            f"=== SLURM evidence ({PLUGIN} {slurm_plugin}; SLURM run {seconds:.0f} s)",
            f"store {STORE}: slurm_job_id={attrs.get('slurm_job_id')!r} slurm_node={attrs.get('slurm_node')!r}",
            "jobcomp.log:",
            *(f"  {line}" for line in (run_dir / "jobcomp.log").read_text().splitlines()),
            "squeue --states=all (id|name|state|tres-per-job|node|comment):",
            *(f"  {line}" for line in queue.splitlines()),
            "per-job logs:",
            *(f"  {path.relative_to(root)}" for path in slurm_logs),
        ]
    )
    _show(pytestconfig, evidence)
    assert job_id.isdigit(), f"the store has no SLURM job id: it was not extracted inside a SLURM job\n{evidence}"
    completed = {job["JobId"]: job for job in jobs if job.get("JobState") == "COMPLETED"}
    assert job_id in completed, f"job {job_id} is not COMPLETED in the job completion log\n{evidence}"
    assert Path(completed[job_id]["WorkDir"]).resolve() == root.resolve(), evidence
    assert job_id in by_id and "extract_activations" in by_id[job_id][5], evidence  # the plugin's comment
    assert "gpu" in by_id[job_id][3], f"job {job_id} was not given the (fake) GPU\n{evidence}"
    extract_logs = [path for path in slurm_logs if "rule_extract_activations" in path.parts]
    assert [path.stem for path in extract_logs] == [job_id], evidence
    job_log = extract_logs[0].read_text()
    assert "rule extract_activations:" in job_log and "1 of 1 steps (100%) done" in job_log, job_log[-3000:]
    # acquire_model and prepare_corpus are localrules: they ran beside snakemake, not as jobs
    assert len(completed) == 1, evidence

    # The same targets locally, in a second working directory: the two stores must be identical.
    local_root = _workdir(tmp_path_factory.mktemp("local-run"))
    local, local_seconds = _snakemake(local_root, "--cores", "2")
    assert local.returncode == 0, (
        f"local run failed ({local_seconds:.0f} s)\n{local.stdout[-4000:]}{local.stderr[-6000:]}"
    )
    with ActivationStore(local_root / STORE) as store:
        assert "slurm_job_id" not in store.attrs
    on_slurm, on_laptop = _store_arrays(root / STORE), _store_arrays(local_root / STORE)
    assert on_slurm.keys() == on_laptop.keys()
    differ = [name for name in on_slurm if not np.array_equal(on_slurm[name], on_laptop[name])]
    summary = (
        f"=== SLURM store vs local store: {len(on_slurm)} arrays compared "
        f"({', '.join(name for name in on_slurm if not name.startswith('docs.'))}), "
        f"{on_slurm['tokens.token_id'].size} tokens; differ: {differ or 'none'}; local run {local_seconds:.0f} s"
    )
    _show(pytestconfig, summary)
    assert not differ, summary
