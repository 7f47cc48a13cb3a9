"""The runner of a `verifiers` environment (see `tidal.envs.verifiers_env`), in a process of its own.

Run as `python -c <this file's text> MODE SPEC`, never imported: it imports nothing of tidal, and the
`verifiers` package it imports may live in a directory of its own on PYTHONPATH (verifiers 0.3 pins
`mcp<2` and `websockets<17`, which vLLM's newer ones would clash with in one process). SPEC is JSON:
`{"env": ID_OR_FILE, "env_args": {...}}`.

- `rows`: writes one JSON object, `{"train": [...], "eval": [...]}`, the environment's datasets as
  tidal rows: `prompt` (the messages' text, for display and length checks), `answer`, `example_id`,
  `split`.
- `serve`: reads one JSON request per line from stdin, `{"id", "split", "example_id", "base_url",
  "api_key", "model"}`, runs that row's rollout against the endpoint with `Environment.run_rollout`
  (its rubric scores it), and writes `{"id", "reward", "metrics", "error"}` per line, many rollouts
  at once; `{"ready": true}` first, once the environment has loaded. It exits when stdin closes.

Every protocol line goes to the stdout it was started with; the environment's own prints and logs
go to stderr. A failure to load writes `{"error": "..."}` and exits 1.
"""

import asyncio
import contextvars
import json
import os
import sys


def _load(spec):
    import verifiers as vf

    major_minor = tuple(int(x) for x in vf.__version__.split(".")[:2] if x.isdigit())
    if major_minor >= (0, 4):
        raise RuntimeError(
            f"verifiers {vf.__version__} has no classic Environment API; tidal runs verifiers 0.3 "
            "(scripts/setup.sh --verifiers installs it)"
        )
    env_id, env_args = spec["env"], spec["env_args"]
    if env_id.endswith(".py"):
        import importlib.util

        path = os.path.abspath(env_id)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no file {path}")
        name = os.path.splitext(os.path.basename(path))[0]
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
        load = getattr(module, "load_environment", None)
        if load is None:
            raise AttributeError(f"{path} has no load_environment()")
        return load(**env_args)
    return vf.load_environment(env_id, **env_args)


def _guard(rubric, failures):
    """Record the exceptions of the rubric's functions: verifiers logs them and scores 0.0, which
    tidal would train on as a real score. Recursive for a RubricGroup's rubrics."""
    import functools
    import inspect

    def recording(func):
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def guarded(*args, **kwargs):
                try:
                    return await func(*args, **kwargs)
                except Exception as e:
                    failures.get().append(f"{getattr(func, '__name__', func)} raised {type(e).__name__}: {e}")
                    raise

        else:

            @functools.wraps(func)
            def guarded(*args, **kwargs):
                try:
                    return func(*args, **kwargs)
                except Exception as e:
                    failures.get().append(f"{getattr(func, '__name__', func)} raised {type(e).__name__}: {e}")
                    raise

        return guarded

    for sub in getattr(rubric, "rubrics", None) or []:
        _guard(sub, failures)
    if isinstance(getattr(rubric, "funcs", None), list):
        rubric.funcs = [recording(f) for f in rubric.funcs]


def _error_text(error):
    """A rollout's error in one line: verifiers keeps it as a dict with its chain of causes."""
    if error is None:
        return None
    if isinstance(error, dict):
        return str(error.get("error_chain_repr") or error.get("message") or error)
    return str(error)


def _text(prompt):
    """The text of a row's prompt (a string, or chat messages whose content may be parts)."""
    if isinstance(prompt, str):
        return prompt
    out = []
    for message in prompt:
        content = message.get("content") if isinstance(message, dict) else getattr(message, "content", "")
        if isinstance(content, list):
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        out.append(content or "")
    return "\n".join(out)


def _datasets(env):
    """(train, eval) datasets; eval is None unless the environment sets its own."""
    train = env.get_dataset()
    env.build_eval_dataset()
    return train, (env.get_eval_dataset() if env.eval_dataset is not None else None)


def _rows(env):
    train, held = _datasets(env)
    out = {}
    for split, ds in (("train", train), ("eval", held)):
        out[split] = [
            {"prompt": _text(row["prompt"]), "answer": str(row.get("answer", "")), "example_id": i, "split": split}
            for i, row in enumerate(ds if ds is not None else [])
        ]
    return out


def _number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


async def _serve(env, datasets, write):
    import httpx
    import verifiers as vf
    from openai import AsyncOpenAI

    train, held = datasets
    failures = contextvars.ContextVar("failures")
    _guard(env.rubric, failures)
    http = httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=None))
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    write({"ready": True})

    async def rollout(request):
        reply = {"id": request.get("id")}
        failures.set([])  # this rollout's task's own list (a task runs in a copy of the context)
        try:
            ds = held if request["split"] == "eval" and held is not None else train
            client = AsyncOpenAI(
                base_url=request["base_url"], api_key=request["api_key"], max_retries=0, http_client=http
            )
            # An environment of text prompts (message_type "completion") calls /v1/completions.
            wrap = vf.OpenAICompletionsClient if env.message_type == "completion" else vf.OpenAIChatCompletionsClient
            out = await env.run_rollout(ds[int(request["example_id"])], wrap(client), request["model"], {})
            metrics = {k: _number(v) for k, v in (out.get("metrics") or {}).items()}
            reply.update(
                reward=_number(out.get("reward")),
                metrics={k: v for k, v in metrics.items() if v is not None},
                error=_error_text(out.get("error")),
            )
            if failures.get() and reply["error"] is None:
                reply["error"] = "the rubric's " + "; ".join(failures.get())
        except Exception as e:
            reply["error"] = f"{type(e).__name__}: {e}"
        write(reply)

    tasks = set()
    while True:
        line = await reader.readline()
        if not line:
            break
        task = asyncio.ensure_future(rollout(json.loads(line)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    for task in list(tasks):
        task.cancel()


def _main():
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # the environment's prints go to stderr, never into the protocol
    sys.stdout = sys.stderr

    def write(obj):
        out.write(json.dumps(obj) + "\n")
        out.flush()

    mode, spec = sys.argv[1], json.loads(sys.argv[2])
    try:
        env = _load(spec)
        if mode == "rows":
            write(_rows(env))
            return
        datasets = _datasets(env)
    except Exception as e:
        write({"error": f"{type(e).__name__}: {e}"})
        sys.exit(1)
    asyncio.run(_serve(env, datasets, write))


if __name__ == "__main__":
    _main()
