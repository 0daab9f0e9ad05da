"""The quick start's last step: serve the base model and the new adapter with vLLM, then ask both
the same new tickets over the OpenAI API.

    .venv/bin/python -I examples/support-tickets/ask_over_http.py [--store out/store]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import openai

from tuneloom.serving.process import ServingProcess

SYSTEM = (
    'Classify the Acme support ticket. Reply with JSON only: {"category": billing|technical|account|shipping|'
    'feature_request, "priority": low|medium|high|urgent}'
)
# Not in train.jsonl: tickets the adapter has never seen.
TICKETS = [
    "I was billed twice for the March invoice, please refund one of the charges.\nRegards, Ana",
    "The dashboard has shown a 502 error since this morning and my whole team is blocked!",
    "How do I change the email address on my account?",
    "My parcel was marked delivered yesterday but nothing arrived.",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="out/store")
    parser.add_argument("--base-model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--adapter", default="support-tickets")
    args = parser.parse_args()

    log = Path(tempfile.gettempdir()) / "tuneloom-quickstart-serve.log"
    print(f"starting vLLM with the base model and the store {args.store} (about a minute; log: {log}) ...")
    serve_args = ["--served-model-name", "base", "--max-model-len", "1024"]
    with ServingProcess(args.base_model, str(Path(args.store).absolute()), log, args=serve_args) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
        print(f"serving at {server.url}/v1; for example:\n")
        print(f"  curl {server.url}/v1/chat/completions -H 'Content-Type: application/json' \\")
        body = json.dumps({"model": args.adapter, "messages": [{"role": "user", "content": "..."}]})
        print(f"    -d '{body}'\n")
        width = len(args.adapter)
        for ticket in TICKETS:
            print(f"ticket   {ticket.splitlines()[0]}")
            for model in ("base", args.adapter):
                reply = client.chat.completions.create(
                    model=model,
                    messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": ticket}],
                    max_tokens=40,
                    temperature=0,
                )
                answer = " ".join(reply.choices[0].message.content.split())
                print(f"  {model:<{width}}  {answer[:100]}   [{reply.model}]")
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
