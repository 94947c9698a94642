"""`hamtune dashboard [NAME]`: optuna-dashboard on an experiment's Optuna study, live while the search runs.

Every search with `searcher: optuna` keeps its study in a journal file in the experiment folder (optuna.journal:
every trial, ASHA-stopped ones as PRUNED with their per-epoch values); optuna-dashboard reads it as it grows, so the
page updates without a restart. optuna-dashboard is an optional extra (`pip install 'hamtune[dashboard]'`).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, make_server

from hamtune.errors import HamtuneError
from hamtune.search import tables as res

Echo = Callable[[str], None]


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args) -> None:  # one line per request would bury the URL
        pass


def study_journal(name: str | None, results_dir: Path) -> tuple[Path, dict]:
    """The journal file of an experiment's study (one line when there is none)."""
    exp_dir = res.experiment_dir(name, results_dir)
    record = res.read_experiment(exp_dir)
    journal = record.get("optuna_storage")
    if not journal or not Path(journal).is_file():
        why = ("it searched with `searcher: random`" if record.get("spec", {}).get("search", {}).get("searcher")
               == "random" else "it was made before hamtune kept Optuna studies, or has not started a trial")
        raise HamtuneError(f"{exp_dir}: no Optuna study to show ({why})")
    return Path(journal), record


def dashboard(name: str | None, *, results_dir: Path = res.RESULTS_DIR, port: int = 8080, host: str = "127.0.0.1",
              echo: Echo = print) -> None:
    """Serve optuna-dashboard for the experiment's study until Ctrl+C."""
    if importlib.util.find_spec("optuna_dashboard") is None:
        raise HamtuneError("hamtune dashboard needs optuna-dashboard: `pip install 'hamtune[dashboard]'` "
                           "(or optuna-dashboard)")
    if not 0 <= port <= 65535:
        raise HamtuneError(f"--port {port}: expected 0..65535")
    journal, record = study_journal(name, results_dir)
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna_dashboard import wsgi

    app = wsgi(JournalStorage(JournalFileBackend(str(journal))))
    try:
        server = make_server(host, port, app, handler_class=_Quiet)
    except OSError as exc:
        raise HamtuneError(f"--port {port}: cannot listen on {host} ({exc.strerror})") from None
    echo(f"optuna-dashboard for experiment {record['name']} ({record.get('state')}), study in {journal}")
    echo(f"serving on http://{host}:{server.server_port}/ (Ctrl+C stops)")
    try:
        server.serve_forever()
    finally:
        server.server_close()
