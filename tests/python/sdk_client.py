#!/usr/bin/env python3
"""A real OpenAI SDK client for the gateway integration tests (tests/gateway_sdk.rs).

Each mode makes one call through the official `openai` package and prints one JSON object on stdout for
the Rust test to assert on. With --expect-error an SDK status error is the expected outcome: it is printed
as {"error": {"class", "status", "body"}} and the exit code is 0. Any other exception (or a success when an
error was expected) exits non-zero with the traceback on stderr.

    sdk_client.py --base-url http://127.0.0.1:PORT/v1 --api-key tkx-... chat --model gpt-4o-mini
    sdk_client.py ... stream --model gpt-4o-mini --include-usage
    sdk_client.py ... embeddings --model text-embedding-3-small --input hello
    sdk_client.py ... models
    sdk_client.py ... --expect-error chat --model no-such-model
"""

import argparse
import json
import sys

import openai

# Exit codes the Rust side tells apart.
EXIT_UNEXPECTED_EXCEPTION = 2
EXIT_MISSING_ERROR = 3


def usage_dict(usage):
    if usage is None:
        return None
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": getattr(usage, "completion_tokens", None),
        "total_tokens": usage.total_tokens,
    }


def messages(args):
    return [{"role": "user", "content": args.prompt}]


def run_chat(client, args):
    kwargs = {"model": args.model, "messages": messages(args)}
    if args.max_tokens is not None:
        kwargs["max_tokens"] = args.max_tokens
    completion = client.chat.completions.create(**kwargs)
    choice = completion.choices[0]
    return {
        "id": completion.id,
        "object": completion.object,
        "model": completion.model,
        "content": choice.message.content,
        "finish_reason": choice.finish_reason,
        "usage": usage_dict(completion.usage),
    }


def run_stream(client, args):
    kwargs = {"model": args.model, "messages": messages(args), "stream": True}
    if args.max_tokens is not None:
        kwargs["max_tokens"] = args.max_tokens
    if args.include_usage:
        kwargs["stream_options"] = {"include_usage": True}
    content = []
    chunks = 0
    content_chunks = 0
    usage_chunks = 0
    usage = None
    finish_reason = None
    ids = set()
    stream = client.chat.completions.create(**kwargs)
    for chunk in stream:
        chunks += 1
        ids.add(chunk.id)
        if chunk.usage is not None:
            usage_chunks += 1
            usage = usage_dict(chunk.usage)
        for choice in chunk.choices:
            if choice.delta is not None and choice.delta.content:
                content_chunks += 1
                content.append(choice.delta.content)
            if choice.finish_reason is not None:
                finish_reason = choice.finish_reason
    return {
        "content": "".join(content),
        "chunks": chunks,
        "content_chunks": content_chunks,
        "usage_chunks": usage_chunks,
        "usage": usage,
        "finish_reason": finish_reason,
        "distinct_ids": len(ids),
    }


def run_embeddings(client, args):
    response = client.embeddings.create(model=args.model, input=args.input)
    return {
        "model": response.model,
        "count": len(response.data),
        "dimensions": [len(item.embedding) for item in response.data],
        "usage": {"prompt_tokens": response.usage.prompt_tokens, "total_tokens": response.usage.total_tokens},
    }


def run_models(client, _args):
    return {"ids": sorted(model.id for model in client.models.list())}


MODES = {"chat": run_chat, "stream": run_stream, "embeddings": run_embeddings, "models": run_models}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--expect-error", action="store_true")
    modes = parser.add_subparsers(dest="mode", required=True)
    for name in ("chat", "stream"):
        mode = modes.add_parser(name)
        mode.add_argument("--model", required=True)
        mode.add_argument("--prompt", default="Say hello.")
        mode.add_argument("--max-tokens", type=int)
        if name == "stream":
            mode.add_argument("--include-usage", action="store_true")
    embeddings = modes.add_parser("embeddings")
    embeddings.add_argument("--model", required=True)
    embeddings.add_argument("--input", nargs="+", required=True)
    modes.add_parser("models")
    return parser.parse_args(argv)


def main(argv):
    args = parse_args(argv)
    # No SDK retries: the gateway fails over by itself, and a retry would double the requests the test counts.
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=args.timeout)
    try:
        result = MODES[args.mode](client, args)
    except openai.APIStatusError as error:
        if not args.expect_error:
            raise
        result = {
            "error": {
                "class": type(error).__name__,
                "status": error.status_code,
                "body": error.body,
            }
        }
        print(json.dumps(result))
        return 0
    print(json.dumps(result))
    if args.expect_error:
        print("expected an openai.APIStatusError, the call succeeded", file=sys.stderr)
        return EXIT_MISSING_ERROR
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except SystemExit:
        raise
    except BaseException:  # noqa: BLE001 - report everything unexpected to the Rust test
        import traceback

        traceback.print_exc()
        sys.exit(EXIT_UNEXPECTED_EXCEPTION)
