# Shared by the CLI test scripts: `expect CODE REGEX -- command...` runs the command and
# checks its exit code and that its output (lines joined) matches REGEX; pass/failed count.
fails=0
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
