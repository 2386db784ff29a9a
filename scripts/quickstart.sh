#!/usr/bin/env bash
# Builds everything and starts slime-router with two mock SGLang workers, the radix-tree
# trajectory cache and OpenAI chat completions on it, so the router can be seen working
# without a GPU. The mock workers reply to the conversation in their prompt. Ctrl-C stops it.
#
#   ROUTER_PORT=30000 WORKER_PORTS="31001 31002" scripts/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROUTER_PORT=${ROUTER_PORT:-30000}
WORKER_PORTS=${WORKER_PORTS:-"31001 31002"}
# A model directory: the test tokenizer and a ChatML chat template.
MODEL=tests/fixtures/chat-model

scripts/setup.sh
cargo build --release --bins

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

workers=()
for port in $WORKER_PORTS; do
    target/release/mock-worker --port "$port" --tokenizer "$MODEL/tokenizer.json" --chat --tokens-per-second 200 >/dev/null &
    pids+=($!)
    workers+=("http://127.0.0.1:$port")
done

target/release/slime-router \
    --sglang-router-port "$ROUTER_PORT" \
    --worker-urls "${workers[@]}" \
    --hf-checkpoint "$MODEL" \
    --slime-router-middleware-paths chat_completions radix_tree \
    --rollout-health-check-interval 5 &
pids+=($!)

base="http://127.0.0.1:$ROUTER_PORT"
for _ in $(seq 100); do curl -sf "$base/list_workers" >/dev/null 2>&1 && break; sleep 0.1; done
cat <<MSG

slime-router is listening on $base with workers: ${workers[*]}
Try, in another terminal:

  curl -s $base/list_workers
  curl -s $base/generate -d '{"text": "<|im_start|>user\\nTell me about the fox<|im_end|>\\n", "return_logprob": true}'
  curl -s $base/retrieve_from_text -d '{"text": "<|im_start|>user\\nTell me about the fox<|im_end|>\\n"}'
  curl -sN $base/generate -d '{"text": "Hello", "stream": true, "sampling_params": {"max_new_tokens": 8}}'
  curl -s $base/v1/chat/completions -d '{"model": "m", "max_tokens": 64, "messages": [{"role": "user", "content": "hello there"}]}'
  curl -s $base/radix_tree/stats
  curl -s $base/metrics

Ctrl-C stops the router and the workers.
MSG
wait
