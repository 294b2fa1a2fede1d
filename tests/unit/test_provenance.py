"""Provenance records: where a job ran is recorded when a scheduler says so."""

from latent_atlas.provenance import execution_context, provenance_record


def test_a_slurm_job_records_its_id_and_node(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURMD_NODENAME", "node07")
    record = provenance_record({"a": 1}, model="m")
    assert record["slurm_job_id"] == "4242" and record["slurm_node"] == "node07" and record["model"] == "m"


def test_a_local_run_records_no_scheduler(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert execution_context() == {}
    assert "slurm_job_id" not in provenance_record({"a": 1})
