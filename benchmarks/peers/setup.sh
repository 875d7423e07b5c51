#!/usr/bin/env bash
# Create .venv-peers/<lib> for each peer library, every install pinned (torch first, the CPU wheel; then the
# same transformers/peft/accelerate as keel's .venv, then the peer), and refuse a venv that pulled CUDA wheels.
# Usage: benchmarks/peers/setup.sh [lib ...]   (default: all). A venv already stamped is left alone.
set -euo pipefail
PY_SYS=${PY_SYS:-python3}
ROOT=.venv-peers
COMMON=(torch==2.13.0 transformers==5.24.0 peft==0.21.2 accelerate==1.15.0)

peer_install() {  # the pinned peer install, with the common pins repeated so pip cannot move them
  local lib=$1 pip=$2
  case $lib in
    steering_vectors)
      # every steering-vectors release requires transformers<5: installed without its dependency pins,
      # its other requirements (tqdm, scikit-learn) pinned here.
      "$pip" install -q "${COMMON[@]}" numpy==2.4.6 scikit-learn==1.8.0 tqdm==4.67.1
      "$pip" install -q --no-deps steering-vectors==0.12.2 ;;
    repeng)  # repeng 0.4.0 requires numpy<2
      "$pip" install -q "${COMMON[@]}" numpy==1.26.4 scikit-learn==1.8.0 gguf==0.19.0 repeng==0.4.0 ;;
    pyvene)
      "$pip" install -q "${COMMON[@]}" numpy==2.4.6 pyvene==0.1.8 ;;
    nnsight)
      "$pip" install -q "${COMMON[@]}" numpy==2.4.6 nnsight==0.8.1 ;;
    transformer_lens)
      "$pip" install -q "${COMMON[@]}" numpy==2.4.6 transformer-lens==4.3.0 ;;
    *) echo "unknown peer $lib" >&2; return 2 ;;
  esac
}

libs=("$@")
[ ${#libs[@]} -gt 0 ] || libs=(steering_vectors repeng pyvene nnsight transformer_lens)
for lib in "${libs[@]}"; do
  venv=$ROOT/$lib
  [ -f "$venv/.installed" ] && continue
  rm -rf "$venv"
  mkdir -p "$ROOT"
  "$PY_SYS" -m venv "$venv"
  pip=$venv/bin/pip
  if ! { "$pip" install -q torch==2.13.0 && peer_install "$lib" "$pip"; } >"$venv/install.log" 2>&1; then
    echo "peer $lib: install failed (log: $venv/install.log)" >&2
    tail -5 "$venv/install.log" >&2
    continue
  fi
  if "$pip" list 2>/dev/null | grep -i '^nvidia-'; then
    echo "peer $lib: CUDA wheels were pulled in; removing the venv" >&2
    rm -rf "$venv"
    continue
  fi
  "$pip" freeze >"$venv/freeze.txt"
  touch "$venv/.installed"
  echo "peer $lib: installed in $venv"
done
