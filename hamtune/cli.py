"""`hamtune` command line: argument parsing and wiring only; every bad input ends as one line and exit code 2."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from hamtune.errors import HamtuneError

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hamtune", description="Hyperparameter search for skin-lesion classification on HAM10000 (Ray Tune).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # data ------------------------------------------------------------------------------------------------------
    data = sub.add_parser("data", help="prepare the decoded-image cache and look at the data")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    for name, help_ in (("prepare", "decode and resize every image once into the cache, and split by lesion"),
                        ("info", "print images and lesions per diagnosis and split; --plots draws the first figures")):
        p = data_sub.add_parser(name, help=help_)
        p.add_argument("--source", default="synthetic",
                       help="a HAM10000 folder (Kaggle or ISIC 2018 Task 3 layout), 'isic2018' (the downloaded "
                            "training set) or 'synthetic' (default)")
        p.add_argument("--split-by", choices=("lesion", "image"), default="lesion",
                       help="'image' only for an ISIC 2018 folder without its lesion-groupings file (leaks lesions)")
        p.add_argument("--image-size", type=int, default=32, help="square size in pixels (default 32)")
        p.add_argument("--cache-dir", type=Path, help="cache folder (default $HAMTUNE_CACHE_DIR or ~/.cache/hamtune)")
        p.add_argument("--strict", action="store_true", help="stop at the first missing or unreadable image")
        p.add_argument("--val", type=float, default=0.15, help="validation fraction (default 0.15)")
        p.add_argument("--test", type=float, default=0.15, help="test fraction (default 0.15)")
        p.add_argument("--split-seed", type=int, default=0)
        p.add_argument("--synthetic-size", type=int, default=3000, help="images in the synthetic set (default 3000)")
        p.add_argument("--synthetic-seed", type=int, default=0)
        p.add_argument("--workers", type=int, help="decoding processes (default: all cores)")
        if name == "info":
            p.add_argument("--plots", type=Path, metavar="DIR", help="write exploration figures to DIR")
    add_download_parser(data_sub)

    # search ----------------------------------------------------------------------------------------------------
    search = sub.add_parser("search", help="run (or resume) a hyperparameter search")
    search.add_argument("--space", type=Path, help="search spec YAML (e.g. search_spaces/default.yaml)")
    search.add_argument("--source", help="data.source override: a HAM10000 folder, 'isic2018' or 'synthetic'")
    search.add_argument("--resume", nargs="?", const="", metavar="NAME",
                        help="continue an interrupted experiment (default: the latest)")
    search.add_argument("--name", help="experiment name (default: the spec's 'experiment')")
    search.add_argument("--num-samples", type=int, help="number of trials")
    search.add_argument("--max-epochs", type=int, help="epochs of a trial that is never stopped early")
    search.add_argument("--max-concurrent", type=int, help="trials running at once")
    search.add_argument("--cpus-per-trial", type=float)
    search.add_argument("--gpus-per-trial", type=float, help="fractions allowed, e.g. 0.5")
    search.add_argument("--seed", type=int, help="searcher seed")
    search.add_argument("--warm-start", metavar="EXPERIMENT",
                        help="seed the searcher with an earlier experiment's finished trials (configs and results)")
    search.add_argument("--address", help="join a running Ray cluster (e.g. 'auto'); default: local Ray on 127.0.0.1")
    search.add_argument("--storage-path", help="shared storage for a multi-node cluster (s3://..., gs://..., NFS path)")
    search.add_argument("--results-dir", type=Path, default=Path("results"))
    search.add_argument("--smoke-test", action="store_true",
                        help="tiny run to check the set-up: 2 trials, 2 epochs, small synthetic data")

    # results ---------------------------------------------------------------------------------------------------
    results = sub.add_parser("results", help="list experiments, or show one experiment's leaderboard")
    results.add_argument("name", nargs="?", help="experiment (default: list all)")
    results.add_argument("--top", type=int, help="show only the best N trials")
    results.add_argument("--sort", help="column to rank by (default: the experiment's metric)")
    results.add_argument("--format", choices=("table", "csv", "markdown"), default="table")
    results.add_argument("--importance", action="store_true",
                         help="hyperparameter importance (Optuna's fANOVA) printed and plotted to importance.png")
    results.add_argument("--results-dir", type=Path, default=Path("results"))

    # best / evaluate / predict -------------------------------------------------------------------------------
    best = sub.add_parser("best", help="show the best trial; --retrain trains it on train+val and tests it once")
    best.add_argument("name", nargs="?", help="experiment (default: the latest)")
    best.add_argument("--metric", help="rank by this metric instead of the experiment's")
    best.add_argument("--mode", choices=("max", "min"))
    best.add_argument("--retrain", action="store_true", help="retrain on train+val, evaluate once on the test split")
    best.add_argument("--epochs", type=int, help="retrain epochs (default: the epoch at which the best trial peaked)")
    best.add_argument("--seeds", type=int, nargs="+", help="retrain once per seed; metrics reported as mean ± std")
    best.add_argument("--tta", action="store_true", help="test-time augmentation (flips and 90° rotations averaged)")
    best.add_argument("--top", type=int, default=1, metavar="K",
                      help="retrain the K best trials and average their probabilities (an ensemble; default 1)")
    best.add_argument("--calibration", type=float, default=0.15, metavar="FRACTION",
                      help="fraction of train+val lesions held back from the retrain to fit the temperature "
                           "(default 0.15; 0 = no temperature scaling)")
    best.add_argument("--results-dir", type=Path, default=Path("results"))

    evaluate = sub.add_parser("evaluate", help="evaluate a saved model on an external labelled image set")
    evaluate.add_argument("--model", type=Path, required=True, help="model.pt written by `hamtune best --retrain`")
    evaluate.add_argument("--images", type=Path, help="folder of images (searched recursively)")
    evaluate.add_argument("--isic2018-test", action="store_true",
                          help="the official ISIC 2018 Task 3 test set from `hamtune data download isic2018-test` "
                               "(instead of --images and --labels)")
    evaluate.add_argument("--labels", type=Path,
                          help="HAM10000 metadata CSV (image_id, dx) or ISIC 2018 Task 3 ground truth (image, MEL, NV, ...)")
    evaluate.add_argument("--out", type=Path, help="report folder (default: <model folder>/eval-<images folder name>)")
    evaluate.add_argument("--tta", action="store_true")

    predict = sub.add_parser("predict", help="class probabilities for images")
    predict.add_argument("--model", type=Path, required=True)
    predict.add_argument("inputs", nargs="+", type=Path, metavar="IMAGE_OR_DIR")
    predict.add_argument("--out", type=Path, help="write CSV or JSON (by extension) instead of printing")
    predict.add_argument("--tta", action="store_true")

    serve = sub.add_parser("serve", help="a local web page and JSON API for one model (research tool, not diagnostic)")
    serve.add_argument("--model", type=Path, required=True, help="model.pt written by `hamtune best --retrain`")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        handler = {"data": cmd_data, "search": cmd_search, "results": cmd_results, "best": cmd_best,
                   "evaluate": cmd_evaluate, "predict": cmd_predict,
                   "serve": cmd_serve}[args.command]
        return handler(args) or 0
    except HamtuneError as exc:
        print(f"hamtune: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("hamtune: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `hamtune predict ... | head`: the reader left; that is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


# ---------------------------------------------------------------------------------------------------------------


def cmd_data(args) -> int:
    from hamtune.data import SplitSpec, prepare

    if args.data_command == "download":
        return cmd_data_download(args)
    prepared = prepare(args.source, args.image_size, cache_dir=args.cache_dir, strict=args.strict,
                       split=SplitSpec(val=args.val, test=args.test, seed=args.split_seed), workers=args.workers,
                       synthetic_size=args.synthetic_size, synthetic_seed=args.synthetic_seed, split_by=args.split_by)
    n = len(prepared.table)
    verb = "decoded" if prepared.decoded else "reused"
    print(f"{verb} {n} images at {prepared.image_size}px -> {prepared.path}"
          + (f" ({len(prepared.problems)} skipped, listed in {prepared.path / 'problems.csv'})" if len(prepared.problems) else ""))
    if args.data_command == "info":
        from hamtune.data.explore import class_table

        print(class_table(prepared).to_string(index=False))
        if args.plots:
            from hamtune.data.explore import write_exploration_plots

            for path in write_exploration_plots(prepared, args.plots):
                print(f"wrote {path}")
    return 0


def cmd_search(args) -> int:
    from hamtune import results as res
    from hamtune.space import load_spec, spec_from_dict

    overrides = {"experiment": args.name, "data.source": args.source,
                 "search.num_samples": args.num_samples, "train.epochs": args.max_epochs,
                 "search.max_concurrent": args.max_concurrent, "resources.cpu": args.cpus_per_trial,
                 "resources.gpu": args.gpus_per_trial, "search.seed": args.seed}
    if args.smoke_test:
        overrides.update({"search.num_samples": args.num_samples or 2, "train.epochs": args.max_epochs or 2,
                          "data.synthetic_size": 300, "data.image_size": 16, "search.grace_period": 1})
        if not args.name:
            overrides["experiment"] = "smoke-test"
    if args.resume is not None and args.warm_start:
        raise HamtuneError("--warm-start starts a new search; --resume continues one with the searcher it had")
    warm_start = res.experiment_dir(args.warm_start, args.results_dir) if args.warm_start else None
    if args.resume is not None:
        if args.space:
            raise HamtuneError("--resume continues an experiment with its own recorded spec; drop --space")
        exp_dir = res.experiment_dir(args.resume or None, args.results_dir)
        record = res.read_experiment(exp_dir)
        spec = spec_from_dict(record["spec"], source=str(exp_dir / res.EXPERIMENT_FILE))
    else:
        if not args.space:
            raise HamtuneError("search needs --space FILE (e.g. search_spaces/default.yaml) or --resume [NAME]")
        spec = load_spec(args.space, overrides)
        name = res.unused_name(spec.experiment, args.results_dir)
        if name != spec.experiment:
            state = res.read_experiment(args.results_dir / spec.experiment).get("state")
            hint = f" (it is {state}: `hamtune search --resume {spec.experiment}` continues it)" if state != "finished" else ""
            print(f"results/{spec.experiment} already holds an experiment{hint}; this search is '{name}'")
            spec.experiment = name

    if args.address:
        os.environ["RAY_ADDRESS"] = args.address  # read by hamtune.search.ray_environment before Ray is imported
    from hamtune.search import run_search

    outcome = run_search(spec, results_dir=args.results_dir, address=args.address, storage_path=args.storage_path,
                         resume=args.resume is not None, warm_start=warm_start)
    from hamtune.payoff import compute_payoff, describe_payoff

    if f"best_{spec.search.metric}" not in outcome.trials.columns:  # every trial failed before its first report
        raise res.no_result_error(outcome.trials, spec.search.metric)
    board = res.leaderboard(outcome.trials, metric=spec.search.metric, mode=spec.search.mode, top=10)
    record = res.read_experiment(outcome.exp_dir)
    print()
    print(f"experiment {spec.experiment}: {outcome.state} in {outcome.wall_time_s:.0f} s"
          + (f", warm-started from {warm_start.name}" if warm_start else ""))
    _, history = res.load_tables(outcome.exp_dir)
    for line in describe_payoff(compute_payoff(outcome.trials, history, record)):
        print(line)
    print(res.format_table(board))
    print(f"\ntables and plots: {outcome.exp_dir}/  (hamtune results {spec.experiment}; hamtune best {spec.experiment} --retrain)")
    if outcome.state != "finished":
        print(f"resume with: hamtune search --resume {spec.experiment}")
        return EXIT_INTERRUPTED
    return 0


def cmd_results(args) -> int:
    from hamtune import results as res

    if not args.name and args.importance:
        raise HamtuneError("--importance needs an experiment: hamtune results NAME --importance")
    if not args.name:
        experiments = res.list_experiments(args.results_dir)
        if not experiments:
            print(f"no experiments under {args.results_dir}/ yet (run `hamtune search --space search_spaces/default.yaml`)")
            return 0
        import pandas as pd

        print(res.format_table(pd.DataFrame(experiments), args.format))
        return 0
    exp_dir = res.experiment_dir(args.name, args.results_dir)
    record = res.read_experiment(exp_dir)
    trials, history = res.load_tables(exp_dir)
    board = res.leaderboard(trials, metric=record["metric"], mode=record["mode"], sort=args.sort, top=args.top)
    if args.format == "table":
        from hamtune.payoff import compute_payoff, describe_payoff

        print(f"{record['name']}: {record.get('state')}, {len(trials)} trials, "
              f"metric {record['metric']} ({record['mode']})"
              + (f", warm-started from {record['warm_start']['experiment']}" if record.get("warm_start") else ""))
        for line in describe_payoff(compute_payoff(trials, history, record)):
            print(line)
    print(res.format_table(board, args.format))
    if args.importance:
        from hamtune.payoff import IMPORTANCE_FILE, describe_importance, param_importance, plot_importance

        importance, what = param_importance(trials, record)
        print()
        print(what)
        if importance is not None:
            print("\n".join(describe_importance(importance)))
            path = plot_importance(importance, exp_dir / IMPORTANCE_FILE, f"{record['name']}: {what.split(' (')[0]}")
            print(f"wrote {path}")
    return 0


def cmd_best(args) -> int:
    from hamtune import results as res
    from hamtune.choose import choose_top, describe_best

    if not args.retrain and (args.epochs is not None or args.seeds or args.tta or args.calibration != 0.15):
        raise HamtuneError("--epochs, --seeds, --tta and --calibration apply to the retrain: add --retrain")
    exp_dir = res.experiment_dir(args.name, args.results_dir)
    choices = choose_top(exp_dir, args.top, metric=args.metric, mode=args.mode)
    if len(choices) < args.top:
        raise HamtuneError(f"--top {args.top}: experiment {exp_dir.name} has only {len(choices)} completed or "
                           "stopped trial(s) with that metric")
    for i, choice in enumerate(choices):
        text = describe_best(choice)
        if len(choices) > 1:  # one header for the experiment, then each trial as "#rank trial ..."
            header, _, rest = text.partition("\n")
            text = (f"{header.replace('best of', f'top {len(choices)} of')}\n" if i == 0 else "\n") + f"#{i + 1} {rest}"
        print(text, flush=True)
    if args.retrain:
        from hamtune.retrain import retrain

        print(flush=True)
        retrain(choices, epochs=args.epochs, seeds=args.seeds, tta=args.tta, calibration=args.calibration,
                echo=_echo)
    return 0


def cmd_evaluate(args) -> int:
    from hamtune.inference import evaluate_external

    if args.isic2018_test:
        if args.images or args.labels:
            raise HamtuneError("--isic2018-test names the images and labels itself; drop --images and --labels")
        from hamtune.data.isic2018 import official_test_set

        args.images, args.labels = official_test_set()
    elif not (args.images and args.labels):
        raise HamtuneError("evaluate needs --images DIR and --labels CSV, or --isic2018-test")
    evaluate_external(args.model, args.images, args.labels, out_dir=args.out, tta=args.tta, echo=_echo)
    return 0


def cmd_predict(args) -> int:
    out = args.out
    if out is not None and out.suffix.lower() not in (".csv", ".json"):
        raise HamtuneError(f"--out {out}: expected a file name ending in .csv or .json")
    from hamtune.inference import predict
    from hamtune.io import atomic_write_json, write_csv
    from hamtune.report import PROB_PREFIX

    table = predict(args.model, args.inputs, tta=args.tta, echo=lambda line: print(line, file=sys.stderr))
    if out is None:
        shown = table.drop(columns=["path"])
        floats = [c for c in shown.columns if c == "probability" or c.startswith(PROB_PREFIX)]
        print(shown.to_string(index=False, formatters={c: "{:.4f}".format for c in floats}))
        return 0
    if out.suffix.lower() == ".csv":
        write_csv(out, table)
    else:
        atomic_write_json(out, table.to_dict(orient="records"))
    print(f"wrote {len(table)} predictions to {out}")
    return 0


def _echo(line: str) -> None:
    print(line, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# `hamtune data download` (issue 12): the ISIC 2018 Task 3 data; the work is in hamtune/data/download.py


def add_download_parser(data_sub) -> None:
    from hamtune.data.download import DATASETS, DEFAULT_RETRIES

    p = data_sub.add_parser("download", help="download, check and unpack the ISIC 2018 Task 3 data (HAM10000)")
    p.add_argument("dataset", choices=(*DATASETS, "all"),
                   help="isic2018-train (10,015 HAM10000 images with lesion ids), isic2018-val (193), "
                        "isic2018-test (1,512, the official test set), or all three")
    p.add_argument("--dest", type=Path, help="data folder (default $HAMTUNE_DATA_DIR or ~/.cache/hamtune/data)")
    p.add_argument("--base-url", help="folder URL that holds the files, for a mirror (default $HAMTUNE_DATA_URL "
                                      "or https://isic-challenge-data.s3.amazonaws.com/2018/)")
    p.add_argument("--retries", type=int, default=DEFAULT_RETRIES,
                   help=f"attempts after a failed one, per file (default {DEFAULT_RETRIES})")


def cmd_data_download(args) -> int:
    from hamtune.data.download import DATASETS, LICENCE, download

    names = list(DATASETS) if args.dataset == "all" else [args.dataset]
    for name in names:
        download(name, args.dest, args.base_url, retries=args.retries, echo=_echo)
    print()
    print(LICENCE)
    return 0


# ---------------------------------------------------------------------------------------------------------------


def cmd_serve(args) -> int:
    from hamtune.serve import serve

    serve(args.model, host=args.host, port=args.port, echo=lambda line: print(line, flush=True))
    return 0


def _version() -> str:
    from hamtune import __version__

    return __version__


if __name__ == "__main__":
    sys.exit(main())
