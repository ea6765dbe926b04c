"""`llm-pipeline`: build the definition, run it locally, run it on SageMaker, manage the registry.

Target: `--target local` (the default) uses the AWS endpoint named by AWS_ENDPOINT_URL*
when set, otherwise the local server on 127.0.0.1 (pipelines/local/server.py: SageMaker's
Pipelines API run by the local engine, S3 and the registry), which the command starts and keeps
running. `--target aws` (or LLM_PIPELINE_TARGET=aws) uses your AWS credentials and account.
`upsert` and `start` are the same code on both targets; `run` is `upsert` + `start --wait` on the
local one.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import NoReturn

from pipelines import (
    EXIT_FAILED,
    UserError,
    cost,
    definition,
    error_line,
    memory_plan,
    pipeline,
    recipe,
    targets,
    tracking,
)
from pipelines.local import runner, server

EXIT_USAGE = 2


# -- reading the arguments ---------------------------------------------------------------

def _parameters(pairs: list[str]) -> dict[str, str]:
    values = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"-p {pair!r}: expected Key=Value (e.g. -p Epochs=2)")
        if not value.strip():
            # Every parameter ends up in the model package's metadata, which holds no empty value.
            raise UserError(f"-p {pair!r}: empty value; give one (an optional setting that is "
                            "off takes 'none')")
        values[key] = value
    return values


def _check_rerun_flags(args) -> None:
    if args.from_step and not args.reuse:
        raise UserError("--from-step needs --reuse EXECUTION, the execution whose outputs the "
                        "steps before it reuse (its id; on AWS also its ARN)")


# -- the commands: each hands its arguments to the module that does its work -------------

def cmd_definition(args) -> int:
    # The region names the images' ECR registry: for AWS it is the one the commands would use.
    region = (targets.aws_region(args.region) if args.target == "aws"
              else args.region or definition.DEFAULT_REGION)
    text = definition.definition_json(
        recipe.load(args.recipe), role_arn=args.role_arn or definition.DEFAULT_ROLE_ARN,
        bucket=args.bucket or definition.DEFAULT_BUCKET, region=region,
        image_tag=args.image_tag, spot=args.spot)
    sys.stdout.write(definition.with_parameter_defaults(text, _parameters(args.parameter)) + "\n")
    return 0


def cmd_run(args) -> int:
    if args.target != "local":
        raise UserError("`run` executes locally; use `upsert` and `start --wait` for SageMaker")
    _check_rerun_flags(args)
    args.job_runner = runner.requested(args.job_runner)
    return pipeline.run(args, _parameters(args.parameter))


def cmd_upsert(args) -> int:
    return pipeline.upsert(args)


def cmd_start(args) -> int:
    _check_rerun_flags(args)
    return pipeline.start(args, _parameters(args.parameter))


def cmd_cost(args) -> int:
    return cost.show_ledger(args)


def cmd_plan(args) -> int:
    return memory_plan.show(recipe.load(args.recipe), _parameters(args.parameter),
                            args.instance_type, args.json)


# The registry actions, and how many package ARNs each takes.
REGISTRY_ACTIONS = {"list": 0, "approve": 1, "reject": 1, "promote": 1, "diff": 2}


def cmd_registry(args) -> int:
    from pipelines import registry

    return registry.run_action(args)


def cmd_endpoint(args) -> int:
    """deploy, invoke, endpoints, undeploy (pipelines/deploy.py). Locally only deploy needs the
    local AWS server (the registry and the artifact); the others read the endpoint records."""
    from pipelines import deploy

    region = (targets.registry_region(args) if args.target == "aws" or args.command == "deploy"
              else None)
    command = {"deploy": deploy.cmd_deploy, "invoke": deploy.cmd_invoke,
               "endpoints": deploy.cmd_endpoints, "undeploy": deploy.cmd_undeploy}[args.command]
    return command(args, region)


def cmd_server(args) -> int:
    job_runner = runner.requested(args.job_runner)
    if args.action == "start":
        url = server.ensure_running(job_runner)
        print(url)
    elif args.action == "stop":
        print("stopped" if server.stop() else "no local server was running")
    elif args.action == "env":
        url = server.ensure_running(job_runner)
        for key, value in server.local_environment(url).items():
            print(f"export {key}={value}")
    else:
        url = server.running_url()
        print(url or "not running")
        return 0 if url else EXIT_FAILED
    return 0


def cmd_console(args) -> int:
    from pipelines.console import api
    from pipelines.console import server as console

    console.serve(api.connect(args.target, args.region), args.host, args.port)
    return 0


def cmd_mlflow(args) -> int:
    return tracking.serve_ui(server.home(), args.host, args.port)


def cmd_recipes(args) -> int:
    print(recipe.listing())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, with_recipe: bool = True, with_params: bool = True) -> None:
        if with_recipe:
            p.add_argument("--recipe", default="sft", help="recipe name or YAML path")
        if with_params:
            p.add_argument("-p", "--parameter", action="append", metavar="Key=Value",
                           help="pipeline parameter override (repeatable)")
        p.add_argument("--target", choices=("local", "aws"),
                       default=os.environ.get("LLM_PIPELINE_TARGET", "local"))
        p.add_argument("--region")
        p.add_argument("--role-arn", help="SageMaker execution role ARN")
        p.add_argument("--bucket", help="S3 bucket for data and artifacts")
        p.add_argument("--image-tag", help="image tag (default: digest of the code)")

    def reruns(p: argparse.ArgumentParser) -> None:
        p.add_argument("--reuse", metavar="EXECUTION",
                       help="re-run part of this earlier execution (id, or ARN on AWS): steps "
                            "not re-run take its outputs; alone, continues it from its failed step")
        p.add_argument("--from-step", metavar="STEP",
                       help="with --reuse: re-run this step and every step downstream of it")

    def job_runner(p: argparse.ArgumentParser) -> None:
        p.add_argument("--job-runner", choices=runner.CHOICES,
                       help="how a local server that this command starts runs its jobs: warm (the "
                            "default) forks each from a process that has imported the ML stack "
                            "already; subprocess starts each as a fresh Python process. "
                            f"{runner.VARIABLE} sets it too; a running server keeps its own "
                            "(stop it to change)")

    def spot(p: argparse.ArgumentParser) -> None:
        p.add_argument("--spot", action="store_true",
                       help="training jobs use managed spot training (MaxWaitSeconds: how long "
                            "each may wait for capacity and run); chosen when the pipeline is "
                            "built, since SageMaker refuses a spot wait on an on-demand job")

    p = sub.add_parser("definition", help="print the pipeline definition JSON")
    common(p)
    spot(p)
    p.set_defaults(func=cmd_definition)
    p = sub.add_parser("run", help="run the pipeline locally: upsert + start --wait on the local "
                                       "endpoint")
    common(p)
    spot(p)
    reruns(p)
    job_runner(p)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("upsert", help="create or update the pipeline on the target")
    common(p, with_params=False)
    spot(p)
    p.set_defaults(func=cmd_upsert)
    p = sub.add_parser("start", help="start an execution on the target")
    common(p)
    p.add_argument("--wait", action="store_true",
                   help="show the steps until it ends; exit non-zero unless it Succeeded")
    p.add_argument("--poll-seconds", type=float,
                   help="how often --wait asks for the execution's status (30 on AWS, 1 locally)")
    reruns(p)
    p.set_defaults(func=cmd_start)
    p = sub.add_parser("cost", help="the cost ledger of an execution")
    common(p, with_params=False)
    p.add_argument("execution", help="execution id (local) or ARN")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_cost)
    p = sub.add_parser("plan", help="each training stage's peak memory per device, whether it "
                                    "fits its instance type, and the cheapest that does")
    p.add_argument("--recipe", default="sft", help="recipe name or YAML path")
    p.add_argument("-p", "--parameter", action="append", metavar="Key=Value",
                   help="pipeline parameter override (repeatable)")
    p.add_argument("--instance-type", help="plan on this instance type instead of the "
                                           "TrainingInstanceType parameter's")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser(
        "registry", help="list, approve, reject, promote or diff model packages",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The SageMaker Model Registry (on --target local, the local server's).\n\n"
                    "  list [--group G]                      packages with status and metrics\n"
                    "  approve|reject ARN [--reason TEXT]\n"
                    "  promote ARN --to-group G [--role-arn R] [--reason TEXT]\n"
                    "      copy an Approved package into group G (created if missing), in this\n"
                    "      account or, with --role-arn, in the account of role R (assumed through\n"
                    "      STS). Idempotent: a package promoted there before is not copied again.\n"
                    "      Across accounts the target account must also be able to read the\n"
                    "      model artifact and evaluation in S3 (bucket policy, KMS key grant):\n"
                    "      this command does not grant that.\n"
                    "  diff ARN_A ARN_B                      what differs, metric deltas B - A")
    p.add_argument("--target", choices=("local", "aws"),
                   default=os.environ.get("LLM_PIPELINE_TARGET", "local"))
    p.add_argument("--region")
    p.add_argument("--role-arn", help="IAM role to assume (STS): promote writes into its account; "
                                      "the other actions work in its account")
    p.add_argument("action", choices=REGISTRY_ACTIONS)
    p.add_argument("arn", nargs="?", help="model package ARN (approve, reject, promote, diff)")
    p.add_argument("other", nargs="?", metavar="ARN_B", help="second package ARN (diff)")
    p.add_argument("--group", help="model package group (list)")
    p.add_argument("--to-group", help="group to promote into (promote)")
    p.add_argument("--reason", help="approval description (approve, reject, promote)")
    p.add_argument("--json", action="store_true", help="machine-readable output (list, diff)")
    p.set_defaults(func=cmd_registry, bucket=None)

    def endpoint_target(p: argparse.ArgumentParser) -> None:
        p.add_argument("--target", choices=("local", "aws"),
                       default=os.environ.get("LLM_PIPELINE_TARGET", "local"))
        p.add_argument("--region")
        p.set_defaults(func=cmd_endpoint, bucket=None, role_arn=None)

    p = sub.add_parser("deploy", help="serve an Approved model package at an endpoint")
    p.add_argument("arn", help="model package ARN (see `registry list`)")
    p.add_argument("--name", help="endpoint name (default: the package's group; a name in use "
                                  "is updated to the package)")
    p.add_argument("--instance-type", help="default: the first the package lists")
    endpoint_target(p)
    p.add_argument("--role-arn", help="--target aws: the role SageMaker hosts the model with "
                                      "(default: LLM_PIPELINE_ROLE_ARN)")
    p.add_argument("--poll-seconds", type=float, default=30.0, help=argparse.SUPPRESS)
    p = sub.add_parser("invoke", help="ask an endpoint")
    p.add_argument("name", help="endpoint name")
    p.add_argument("--prompt", required=True, help="the user message")
    p.add_argument("--tenant", help="the tenant whose adapter answers (multi-tenant endpoints)")
    p.add_argument("--max-new-tokens", type=int, help="answer length limit")
    p.add_argument("--raw", action="store_true",
                   help="send the prompt as is ({\"inputs\": ...}), without the chat template")
    endpoint_target(p)
    p = sub.add_parser("endpoints", help="list endpoints: package, status, URL")
    endpoint_target(p)
    p = sub.add_parser("undeploy", help="stop an endpoint (on AWS: delete it, its config and "
                                        "model)")
    p.add_argument("name", help="endpoint name")
    endpoint_target(p)
    p = sub.add_parser("server", help="the local server: SageMaker pipelines, S3, the registry")
    p.add_argument("action", choices=("start", "stop", "status", "env"))
    job_runner(p)
    p.set_defaults(func=cmd_server)
    p = sub.add_parser("console", help="the web console: pipelines, executions, model packages",
                       description="Serves the web console and prints its URL, which carries the "
                                   "token that every request needs.")
    p.add_argument("--target", choices=("local", "aws"),
                   default=os.environ.get("LLM_PIPELINE_TARGET", "local"))
    p.add_argument("--region")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8765, help="port to listen on (0: any free one)")
    p.set_defaults(func=cmd_console)
    p = sub.add_parser("mlflow", help="MLflow's UI on the local tracking store (every local "
                                      "execution, its steps' params, metrics and plots)")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=5000, help="port to listen on")
    p.set_defaults(func=cmd_mlflow)
    p = sub.add_parser("recipes", help="list the recipes")
    p.set_defaults(func=cmd_recipes)
    return parser


def _check_registry_args(parser: argparse.ArgumentParser, args) -> None:
    wanted, given = REGISTRY_ACTIONS[args.action], [a for a in (args.arn, args.other) if a]
    if len(given) != wanted:
        what = {0: "no model package ARN", 1: "one model package ARN",
                2: "two model package ARNs (A and B)"}[wanted]
        parser.error(f"registry {args.action} takes {what}, got {len(given)}")
    if (args.action == "promote") != bool(args.to_group):
        parser.error("--to-group GROUP goes with registry promote, and promote needs it")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "registry":
        _check_registry_args(parser, args)
    try:
        return args.func(args)
    except UserError as exc:
        print(error_line(str(exc)), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def program() -> NoReturn:
    """`llm-pipeline` as a program: `main`, then leave at once with its exit status, once its
    output is flushed. The interpreter's teardown of what a command loaded (boto3's clients and
    their service models: some 90,000 objects) took 0.1 to 0.3 s after every command had done
    its work, which a user waits for as for the work; nothing is left to close by then (files are
    closed, a command's threads are daemons and done). A bug's exception still leaves with its
    traceback."""
    _exit(main())


def _exit(code: int) -> NoReturn:
    # The program's one way out (benchmarks/orchestration.py's timing hooks write their record
    # here, as at a stage's contract._exit).
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    program()
