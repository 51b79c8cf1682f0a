#!/usr/bin/env bash
# Plots step time per image and memory per rank against model size and mesh from
# docs/scaling.tsv (the measured rows of docs/BENCHMARKS.md, with `plan`'s full fine-tuning
# memory beside them) into docs/scaling.png (gnuplot, from Debian's gnuplot-nox, installed if
# missing). usage: bench/plot_scaling.sh [TABLE.tsv] [OUT.png]
#
# TSV columns (tab-separated, '#' lines ignored):
#   label  params_M  precision  ranks  mesh  step_s  images_per_step  mem_gb_per_rank  source
# source: measured (a `shardtune train` run; step_s its median step) or plan (`shardtune plan`;
# step_s empty, "-").
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
table=${1:-$here/docs/scaling.tsv}
out=${2:-$here/docs/scaling.png}
[[ -f $table ]] || { echo "plot_scaling.sh: $table: no such file" >&2; exit 1; }
if ! command -v gnuplot >/dev/null; then
  sudo=""; [[ $(id -u) -eq 0 ]] || sudo="sudo"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends gnuplot-nox >/dev/null
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
grep -v '^#' "$table" | awk -F'\t' '$9 == "measured" && $3 == "fp32"' >"$tmp/m_fp32.tsv"
grep -v '^#' "$table" | awk -F'\t' '$9 == "measured" && $3 == "bf16"' >"$tmp/m_bf16.tsv"
grep -v '^#' "$table" | awk -F'\t' '$9 == "plan"' >"$tmp/plan.tsv"
gnuplot <<GP
set terminal pngcairo size 1100,460 font ",10" noenhanced
set output "$out"
set datafile separator "\t"
set multiplot layout 1,2 title "LoRA (r=8, q and v, + head) on a 2-core, 24 GiB CPU VM: ViT-B/16, ViT-g/14, ViT-e/14"
set logscale xy
set grid
set xrange [40:10000]
set xlabel "backbone parameters (millions)"
set key bottom right
set yrange [0.05:40]
set ylabel "seconds per image (median step / images per step)"
plot "$tmp/m_fp32.tsv" using 2:(\$6/\$7) with points pt 7 ps 1.3 title "fp32", \
     "$tmp/m_fp32.tsv" using 2:(\$6/\$7):5 with labels offset 1,-0.8 left font ",8" notitle, \
     "$tmp/m_bf16.tsv" using 2:(\$6/\$7) with points pt 5 ps 1.3 title "bf16 frozen weights", \
     "$tmp/m_bf16.tsv" using 2:(\$6/\$7):5 with labels offset 1,0.8 left font ",8" notitle
set ylabel "memory per rank (GB)"
set yrange [0.3:300]
set key top left
plot "$tmp/m_fp32.tsv" using 2:8 with points pt 7 ps 1.3 title "LoRA fp32, measured peak RSS", \
     "$tmp/m_bf16.tsv" using 2:8 with points pt 5 ps 1.3 title "LoRA bf16, measured peak RSS", \
     "$tmp/m_bf16.tsv" using 2:8:5 with labels offset 1,0.8 left font ",8" notitle, \
     "$tmp/plan.tsv" using 2:8 with points pt 9 ps 1.5 title "full fine-tuning fp32, one process (plan)", \
     25.8 with lines dt 2 lw 1.5 title "this machine (24 GiB = 25.8 GB)"
unset multiplot
GP
echo "wrote $out"
