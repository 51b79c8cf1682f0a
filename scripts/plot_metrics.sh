#!/usr/bin/env bash
# Plots the loss and the evaluation top-1 of a run from its metrics.jsonl (gnuplot, from
# Debian's gnuplot-nox, installed if missing). usage: scripts/plot_metrics.sh RUN_DIR [OUT.png]
set -euo pipefail
run=${1:?usage: plot_metrics.sh RUN_DIR [OUT.png]}
out=${2:-$run/metrics.png}
[[ -f $run/metrics.jsonl ]] || { echo "plot_metrics.sh: $run/metrics.jsonl: no such file"; exit 1; }
if ! command -v gnuplot >/dev/null; then
  sudo=""; [[ $(id -u) -eq 0 ]] || sudo="sudo"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends gnuplot-nox >/dev/null
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# step lines -> "step loss", eval lines -> "step eval_top1 [val_top1]"
grep '"loss"' "$run/metrics.jsonl" | sed -E 's/.*"step":([0-9]+).*"loss":([-0-9.e]+).*/\1 \2/' >"$tmp/loss.dat"
grep '"eval_top1"' "$run/metrics.jsonl" | sed -E 's/.*"step":([0-9]+).*"eval_top1":([-0-9.e]+).*/\1 \2/' >"$tmp/eval.dat" || true
gnuplot <<GP
set terminal pngcairo size 900,400 font ",10" noenhanced
set output "$out"
set multiplot layout 1,2 title "$(basename "$run")"
set xlabel "step"; set ylabel "training loss"; set grid
plot "$tmp/loss.dat" using 1:2 with lines lw 1.5 title "loss"
set ylabel "top-1"; set yrange [0:1]; set xrange [0:*]
plot "$tmp/eval.dat" using 1:2 with linespoints pt 7 lw 1.5 title "eval top-1"
unset multiplot
GP
echo "wrote $out"
