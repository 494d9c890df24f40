#!/usr/bin/env bash
# streamfeedback in a shell pipeline: records stream to stdout as NDJSON, one per prompt, so
# jq can summarise them as they arrive. Needs jq (https://jqlang.org: apt install jq,
# brew install jq). Logs go to stderr and stay out of the pipe.
#
#   bash examples/jq_pipeline.sh [CONFIG.toml]     (no need to activate the README's .venv)
#
# Prints, per generator model: how many responses it wrote, how many the judge rated, and
# their mean rating (null ratings, where the judge's answer was unreadable, are left out).
# Then the binarize step turns the same records into DPO pairs and counts them.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
config="${1:-$here/quickstart.toml}"
# The program: $STREAMFEEDBACK (e.g. "python -m streamfeedback"), else `streamfeedback` on the
# PATH (an activated venv), else the README's own setup, .venv beside examples/.
if [[ -n "${STREAMFEEDBACK:-}" ]]; then
  sf="$STREAMFEEDBACK"
elif command -v streamfeedback >/dev/null; then
  sf=streamfeedback
elif [[ -x "$here/../.venv/bin/streamfeedback" ]]; then
  sf="$here/../.venv/bin/streamfeedback"
else
  echo "jq_pipeline.sh: streamfeedback not found: run the README's setup (python3 -m venv .venv" \
    "&& .venv/bin/pip install -e .), activate a venv that has it, or set STREAMFEEDBACK" >&2
  exit 127
fi

command -v jq >/dev/null || { echo "jq_pipeline.sh: jq is not installed (apt install jq)" >&2; exit 127; }

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# One run, kept in a file so both steps below read the same records. jq folds the stream
# with `reduce inputs`, so it holds one record at a time, however long the run.
$sf -q run "$config" | tee "$tmp/out.ndjson" |
  jq -n -r '
    reduce (inputs | [.generation_models, .ratings] | transpose[]) as [$model, $rating]
      ({}; .[$model].responses += 1
           | if $rating != null then .[$model].rated += 1 | .[$model].sum += $rating else . end)
    | ["model", "responses", "rated", "mean_rating"],
      (to_entries | sort_by(.key)[]
       | [.key, .value.responses, (.value.rated // 0),
          (if .value.rated then (.value.sum / .value.rated * 100 | round / 100) else "-" end)])
    | @tsv'

# The same records as DPO pairs; count them and check chosen beats rejected on every row.
$sf -q binarize "$tmp/out.ndjson" |
  jq -n -r 'reduce inputs as $p ({pairs: 0, ok: 0};
              .pairs += 1 | if $p.score_chosen > $p.score_rejected then .ok += 1 else . end)
            | "DPO pairs: \(.pairs), chosen scored above rejected in \(.ok)"'
