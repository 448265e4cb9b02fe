#!/usr/bin/env bash
# The main job, end to end on loopback: a manager and two peers, and files
# moving from peer1 to peer2. Works on copies of peer1/ and peer2/ in a temp
# folder, so the repository stays as it is; everything is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")"

SIZE_MIB=${SIZE_MIB:-64}
cargo build --release --quiet
bin=$PWD/target/release
work=$(mktemp -d "${TMPDIR:-/tmp}/shoal-demo.XXXXXX")
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

cp -r peer1 peer2 "$work/"
echo "== generating a ${SIZE_MIB} MiB file in peer1"
head -c "$((SIZE_MIB << 20))" /dev/urandom > "$work/peer1/big.bin"

echo "== starting the manager"
"$bin/manager" --listen 127.0.0.1:0 2> "$work/manager.log" < /dev/null &
pids+=($!)
for _ in $(seq 100); do
  addr=$(sed -n 's/.*manager listening on \([0-9.:]*\).*/\1/p' "$work/manager.log")
  [ -n "$addr" ] && break
  sleep 0.05
done
[ -n "$addr" ] || { echo "manager did not start:"; cat "$work/manager.log"; exit 1; }
echo "   manager at $addr"

echo "== starting peer1 (shares file1.txt and big.bin)"
"$bin/peer" --dir "$work/peer1" --manager "$addr" 2> "$work/peer1.log" < /dev/null &
pids+=($!)
for _ in $(seq 200); do
  "$bin/peer" --manager "$addr" files 2>/dev/null | grep -q big.bin && break
  sleep 0.05
done

echo "== the network, as the manager sees it"
"$bin/peer" --manager "$addr" peers
"$bin/peer" --manager "$addr" files

for name in file1.txt big.bin; do
  echo "== peer2: get $name"
  "$bin/peer" --dir "$work/peer2" --manager "$addr" get "$name"
  cmp "$work/peer1/$name" "$work/peer2/$name"
  echo "   $name in peer2 is byte-identical to peer1's"
done
echo "== done: peer2 now holds $(ls "$work/peer2" | tr '\n' ' ')"
