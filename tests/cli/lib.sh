# Shared by the CLI test scripts: `expect CODE REGEX -- command...` runs the command and
# checks its exit code and that its output (lines joined) matches REGEX; pass/failed count.
fails=0
# train.frozen_gemm=auto's measurements: one cache per test script, inside its work folder.
export XDG_CACHE_HOME="${work:-${TMPDIR:-/tmp}}/xdg_cache"
pass() { echo "ok: $*"; }
failed() { echo "FAIL: $*"; fails=$((fails + 1)); }

expect() {
  local code=$1 regex=$2; shift 3
  local out rc
  out=$("$@" 2>&1); rc=$?
  if [[ $rc -ne $code ]] || ! tr '\n' ' ' <<<"$out" | grep -Eq -- "$regex"; then
    failed "$* -> exit $rc (want $code)"; echo "$out" | tail -15 | sed 's/^/    /'; echo "    (wanted /$regex/)"
  else
    pass "$*"
  fi
}

finish() {
  echo "$fails failure(s)"
  [[ $fails -eq 0 ]]
}

# The tiny ViT of the CLI tests (28 px Fashion-MNIST, dim 32, 4 heads, mlp 64, 5 classes):
# `tiny_model_ini DEPTH` prints its [model] section.
tiny_model_ini() {
  cat <<INI
[model]
arch = vit
image_size = 28
patch_size = 7
in_chans = 1
dim = 32
depth = $1
heads = 4
mlp_dim = 64
num_classes = 5
INI
}

# `tiny_run_ini DEPTH` prints the model plus a 6-step LoRA run on 256 images of classes 0-4.
tiny_run_ini() {
  tiny_model_ini "$1"
  cat <<INI
[peft]
method = lora
[data]
classes = 0-4
train_samples = 256
val_samples = 64
eval_samples = 200
batch_size = 16
[train]
steps = 6
lr = 0.01
warmup_steps = 2
seed = 4
INI
}
