"""A team's set-up, for real: PostgreSQL (started here, on loopback), `mlflow server` with MLflow's
own authentication (basic-auth, its user store on the same PostgreSQL) and it as backend store and
a served artifact store, search workers sharing one Optuna study on it; every client passes its
credentials through MLflow's environment variables."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import mlflow
import numpy as np
import optuna
import pytest
from mlflow.server import get_app_client
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from melanoma.servers import background_server, free_port, model_server
from tests.components import postgres_server

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "cnn", "--epochs", "1", "--img_size", "32", "--demo_size", "16", "--batch_size", "16",
        "--bootstrap", "50", "--gradcam_images", "0", "--num_threads", "1"]
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("team")]  # one PostgreSQL and server for them all


USER, PASSWORD = "alice", "a-long-team-password-42"
ADMIN_PASSWORD = "an-admin-password-4242"


class Team:
    def __init__(self, tracking_uri: str, optuna_url: str):
        self.tracking_uri, self.optuna_url = tracking_uri, optuna_url

    def env(self, tmp_path: Path) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env.update(MLFLOW_TRACKING_URI=self.tracking_uri, MLFLOW_TRACKING_USERNAME=USER,
                   MLFLOW_TRACKING_PASSWORD=PASSWORD, MELANOMA_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))
        return env


def auth_config(path: Path, user_store: str) -> Path:
    """MLflow's basic-auth settings as docs/deploy.md writes them: users on PostgreSQL, every team
    member may read and edit, the admin's password from the environment."""
    path.write_text(f"[mlflow]\ndefault_permission = EDIT\ndatabase_uri = {user_store}\nadmin_username = admin\n"
                    "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    return path


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    artifacts = tmp_path_factory.mktemp("served-artifacts")
    with postgres_server("mlflow", "optuna", "mlflow_auth") as databases:
        url = f"http://127.0.0.1:{free_port()}"
        command = [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
                   "--backend-store-uri", databases["mlflow"], "--artifacts-destination", str(artifacts),
                   "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1], "--workers", "2"]
        env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(auth_config(artifacts.parent / "auth.ini",
                                                                        databases["mlflow_auth"])),
               "MLFLOW_FLASK_SERVER_SECRET_KEY": "a-test-secret", "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD}
        with background_server(command, url, env=env, timeout=300, ready="/health"):
            with pytest.MonkeyPatch.context() as monkeypatch:  # the admin adds the team's user
                monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
                monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
                get_app_client("basic-auth", tracking_uri=url).create_user(USER, PASSWORD)
            yield Team(url, databases["optuna"])


@pytest.fixture
def client(team, monkeypatch) -> MlflowClient:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", team.tracking_uri)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    mlflow.set_tracking_uri(team.tracking_uri)
    return MlflowClient(team.tracking_uri)


def status_of(url: str, credentials: tuple[str, str] | None) -> int:
    request = urllib.request.Request(url + "/api/2.0/mlflow/experiments/search?max_results=1")
    if credentials:
        token = base64.b64encode(":".join(credentials).encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_the_server_lets_in_only_the_team(team):
    assert status_of(team.tracking_uri, None) == 401
    assert status_of(team.tracking_uri, (USER, "a-wrong-password")) == 401
    assert status_of(team.tracking_uri, ("mallory", PASSWORD)) == 401
    assert status_of(team.tracking_uri, (USER, PASSWORD)) == 200


def melanoma(team: Team, tmp_path: Path, *args: str) -> subprocess.Popen:
    tmp_path.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "melanoma.cli", *args], env=team.env(tmp_path), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: float = 600) -> str:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err[-4000:]
    return out


def test_train_register_and_serve_through_the_tracking_server(team, client, tmp_path):
    finish(melanoma(team, tmp_path, "train", *TINY, "--experiment", "team-train"))
    (run,) = client.search_runs([client.get_experiment_by_name("team-train").experiment_id])
    assert run.info.status == "FINISHED" and run.info.artifact_uri.startswith("mlflow-artifacts:")
    finish(melanoma(team, tmp_path, "register", "--run-id", run.info.run_id, "--name", "team-model"))
    assert client.get_model_version_by_alias("team-model", "champion").run_id == run.info.run_id

    jpeg = base64.b64encode(cv2.imencode(".jpg", np.full((64, 64, 3), 120, np.uint8))[1].tobytes()).decode()
    env = team.env(tmp_path)  # the tracking URI and nothing else: artifacts come through the server
    with model_server("models:/team-model@champion", env) as (url, _):
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[jpeg]]}}).encode()
        request = urllib.request.Request(url + "/invocations", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            (row,) = json.loads(response.read())["predictions"]
    assert 0 <= row["malignant_probability"] <= 1


def search(team: Team, tmp_path: Path, study: str, n_trials: int, experiment: str) -> subprocess.Popen:
    return melanoma(team, tmp_path, "search", *TINY, "--n_trials", str(n_trials), "--storage", team.optuna_url,
                    "--study_name", study, "--registered_model", study, "--heartbeat", "1", "--pruner", "none",
                    "--experiment", experiment)


def finished_trials(study: optuna.Study) -> list:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))


def test_two_workers_share_one_study_and_register_the_best_once(team, client, tmp_path):
    args = ["mlflow", "run", str(ROOT), "-e", "search", "--env-manager", "local", "--experiment-name", "team-search",
            "-P", "model=cnn", "-P", "epochs=1", "-P", "img_size=32", "-P", "demo_size=16", "-P", "batch_size=16",
            "-P", "gradcam_images=0", "-P", "n_trials=2", "-P", f"storage={team.optuna_url}",
            "-P", "study_name=shared", "-P", "registered_model=shared", "-P", "heartbeat=1"]
    client.create_experiment("team-search")  # once, first: two `mlflow run`s creating it at once collide
    workers = [subprocess.Popen([sys.executable, "-m", *args], env=team.env(tmp_path / f"worker{i}"), cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for worker in workers:
        assert worker.wait(timeout=900) == 0, worker.stderr.read()[-4000:]

    study = optuna.load_study(study_name="shared", storage=team.optuna_url)
    trials = finished_trials(study)
    assert len(trials) == 2 and len(study.trials) == 2  # not 2 x 2, and none failed
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 2  # no parameters ran twice
    experiment = client.get_experiment_by_name("team-search").experiment_id
    searches = client.search_runs([experiment], "tags.search = 'true'")
    assert len(searches) == 2
    parents = {client.get_run(t.user_attrs["mlflow_run_id"]).data.tags["mlflow.parentRunId"] for t in trials}
    assert parents <= {r.info.run_id for r in searches}
    versions = client.search_model_versions("name = 'shared'")
    assert len(versions) == 1 and versions[0].run_id == study.best_trial.user_attrs["mlflow_run_id"]
    assert client.get_model_version_by_alias("shared", "champion").version == versions[0].version


def test_a_worker_killed_mid_trial_has_its_trial_retried_and_the_study_completes(team, client, tmp_path):
    storage = optuna.storages.RDBStorage(team.optuna_url)
    doomed = search(team, tmp_path / "doomed", "retried", 2, "team-doomed")
    deadline = time.time() + 300
    while time.time() < deadline:  # until the doomed worker is inside a trial's training
        try:
            running = optuna.load_study(study_name="retried", storage=storage).get_trials(
                deepcopy=False, states=(TrialState.RUNNING,))
        except KeyError:  # the study does not exist yet
            running = []
        if running and "mlflow_run_id" in running[0].user_attrs:
            break
        assert doomed.poll() is None, doomed.stderr.read()[-4000:]
        time.sleep(0.2)
    killed = running[0]
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()

    finish(search(team, tmp_path / "survivor", "retried", 2, "team-survivor"))
    study = optuna.load_study(study_name="retried", storage=storage)
    assert study.trials[killed.number].state == TrialState.FAIL
    assert len(finished_trials(study)) == 2
    (retry,) = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed.number]
    assert retry.state == TrialState.COMPLETE and retry.params == killed.params
    assert client.get_run(killed.user_attrs["mlflow_run_id"]).info.status == "FAILED"  # not RUNNING forever
    assert len(client.search_model_versions("name = 'retried'")) == 1


def test_the_study_storage_survives_the_database_closing_its_connections(team):
    """What a night idle looks like to a worker: the server (or a firewall) has closed its pooled
    connections; pool_pre_ping replaces them instead of failing the next trial."""
    import sqlalchemy

    from melanoma.workflows.distributed import make_storage

    storage = make_storage(team.optuna_url, heartbeat_seconds=1)
    study = optuna.create_study(study_name="idle", storage=storage)
    study.enqueue_trial({"x": 1.0})
    admin = sqlalchemy.create_engine(team.optuna_url, poolclass=sqlalchemy.pool.NullPool)
    with admin.connect() as connection:
        closed = connection.execute(sqlalchemy.text(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = 'optuna' AND pid <> pg_backend_pid()")).scalar()
    admin.dispose()
    assert closed >= 1
    assert [t.state for t in study.get_trials()] == [TrialState.WAITING]
