#!/usr/bin/env bash
# Fetches the covariance corpus of ROME/MEMIT/AlphaEdit (compiler/src/methods/corpus.rs): WordNet 3.0
# (Princeton's WordNet licence: use, copy and redistribution allowed with its notice) from
# Debian's wordnet-base package, unpacked into $AMEND_CACHE/wordnet-3.0
# (default ~/.cache/amend/wordnet-3.0) with its copyright file.
# Does nothing when it is already there and intact.
set -euo pipefail
CACHE="${AMEND_CACHE:-$HOME/.cache/amend}"
DIR="$CACHE/wordnet-3.0"
# sha256 of the four data files, as Debian's wordnet-base 1:3.0-37 ships them.
SUMS="$(cat <<'SUMS'
fea17d2f9656611334eac790e5d69e47645fa180c4aa481fb4cd9b3520754ca2  data.noun
adcf43e35b581e8036d8b5a52d63d9cd3d3b4870b2720d3c03c799df44777bc2  data.verb
c89120dfc1f046ddff4a631bf9b7e9fa1a36b5e86565a23bf82dbe14f30b88a7  data.adj
444a63bf3955080ab7524f5079cfc07ff9bc682cb98bdb1db73b0fb9829f1139  data.adv
SUMS
)"
check() { [ -f "$DIR/data.noun" ] && (cd "$DIR" && echo "$SUMS" | sha256sum --check --status); }
if check; then echo "$DIR"; exit 0; fi
TMP="$(mktemp -d)"; trap 'rm -rf "$TMP"' EXIT
cd "$TMP"
# apt-get download needs the package lists; fetch them once when they are missing.
if ! apt-get download wordnet-base >/dev/null 2>&1; then
  apt-get update -qq >&2 || true
  apt-get download wordnet-base >&2
fi
dpkg-deb -x wordnet-base_*.deb x
mkdir -p "$DIR.tmp"
for f in data.noun data.verb data.adj data.adv; do cp "x/usr/share/wordnet/$f" "$DIR.tmp/"; done
cp x/usr/share/doc/wordnet-base/copyright "$DIR.tmp/COPYRIGHT"
rm -rf "$DIR"; mv "$DIR.tmp" "$DIR"
check || { echo "fetch-corpus: sha256 mismatch in $DIR" >&2; rm -rf "$DIR"; exit 1; }
echo "$DIR"
