#!/usr/bin/env python3
"""An official OpenAI SDK client for the billing tests (tests/ledger_e2e.rs).

Every mode makes one call through the `openai` package with `with_raw_response`, so that it can report the
gateway's `x-tokex-request-id` header (the usage record's request id) next to what the SDK parsed. It prints
one JSON object on stdout. With --expect-error an SDK status error is the expected outcome and is printed as
{"error": {"class", "status", "body", "request_id"}} with exit code 0.

    ledger_client.py --base-url http://127.0.0.1:PORT/v1 --api-key tkx-... chat --model gpt-4o-mini --max-tokens 5
    ledger_client.py ... stream --model gpt-4o-mini --max-tokens 5 --include-usage
    ledger_client.py ... disconnect --model gpt-4o-mini --max-tokens 40 --after 3
    ledger_client.py ... embeddings --model text-embedding-3-small --input hello world
    ledger_client.py ... --expect-error chat --model unpriced-model

`disconnect` reads a stream until `--after` content chunks arrived, then closes the connection and exits, as
a buyer who stops reading would.
"""

import argparse
import json
import sys

import openai

EXIT_UNEXPECTED_EXCEPTION = 2
EXIT_MISSING_ERROR = 3
REQUEST_ID_HEADER = "x-tokex-request-id"


def usage_dict(usage):
    if usage is None:
        return None
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def chat_kwargs(args, stream):
    kwargs = {"model": args.model, "messages": [{"role": "user", "content": args.prompt}]}
    if args.max_tokens is not None:
        kwargs["max_tokens"] = args.max_tokens
    if stream:
        kwargs["stream"] = True
        if getattr(args, "include_usage", False):
            kwargs["stream_options"] = {"include_usage": True}
    return kwargs


def run_chat(client, args):
    raw = client.chat.completions.with_raw_response.create(**chat_kwargs(args, stream=False))
    completion = raw.parse()
    return {
        "status": raw.status_code,
        "request_id": raw.headers.get(REQUEST_ID_HEADER),
        "content": completion.choices[0].message.content,
        "finish_reason": completion.choices[0].finish_reason,
        "usage": usage_dict(completion.usage),
    }


def read_stream(stream, stop_after=None):
    """Reads chunks; with `stop_after`, stops once that many content chunks arrived."""
    content = []
    usage = None
    finish_reason = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = usage_dict(chunk.usage)
        for choice in chunk.choices:
            if choice.delta is not None and choice.delta.content:
                content.append(choice.delta.content)
            if choice.finish_reason is not None:
                finish_reason = choice.finish_reason
        if stop_after is not None and len(content) >= stop_after:
            break
    return content, usage, finish_reason


def run_stream(client, args):
    raw = client.chat.completions.with_raw_response.create(**chat_kwargs(args, stream=True))
    content, usage, finish_reason = read_stream(raw.parse())
    return {
        "status": raw.status_code,
        "request_id": raw.headers.get(REQUEST_ID_HEADER),
        "content": "".join(content),
        "content_chunks": len(content),
        "finish_reason": finish_reason,
        "usage": usage,
    }


def run_disconnect(client, args):
    raw = client.chat.completions.with_raw_response.create(**chat_kwargs(args, stream=True))
    stream = raw.parse()
    content, _usage, finish_reason = read_stream(stream, stop_after=args.after)
    # Closes the HTTP response, and with it (no keep-alive reuse of a half-read body) the connection.
    stream.close()
    client.close()
    return {
        "status": raw.status_code,
        "request_id": raw.headers.get(REQUEST_ID_HEADER),
        "content": "".join(content),
        "content_chunks": len(content),
        "finish_reason": finish_reason,
    }


def run_embeddings(client, args):
    raw = client.embeddings.with_raw_response.create(model=args.model, input=args.input)
    response = raw.parse()
    return {
        "status": raw.status_code,
        "request_id": raw.headers.get(REQUEST_ID_HEADER),
        "count": len(response.data),
        "usage": {"prompt_tokens": response.usage.prompt_tokens, "total_tokens": response.usage.total_tokens},
    }


MODES = {"chat": run_chat, "stream": run_stream, "disconnect": run_disconnect, "embeddings": run_embeddings}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--expect-error", action="store_true")
    modes = parser.add_subparsers(dest="mode", required=True)
    for name in ("chat", "stream", "disconnect"):
        mode = modes.add_parser(name)
        mode.add_argument("--model", required=True)
        mode.add_argument("--prompt", default="Say hello.")
        mode.add_argument("--max-tokens", type=int)
        if name == "stream":
            mode.add_argument("--include-usage", action="store_true")
        if name == "disconnect":
            mode.add_argument("--after", type=int, default=3)
    embeddings = modes.add_parser("embeddings")
    embeddings.add_argument("--model", required=True)
    embeddings.add_argument("--input", nargs="+", required=True)
    return parser.parse_args(argv)


def main(argv):
    args = parse_args(argv)
    # No SDK retries: a retry would be a second request, billed on its own.
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
                "request_id": error.response.headers.get(REQUEST_ID_HEADER),
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
