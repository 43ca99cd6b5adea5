#!/usr/bin/env bash
# Fetch real English text for the built-in corpus, offline from the Debian mirror:
# the plain-text fortune files of the `fortunes` and `fortunes-min` packages (~2.5 MB,
# ~15k short documents separated by "%" lines). No root install: the packages are
# downloaded and unpacked into a temporary directory with dpkg -x.
#
#   scripts/get_corpus.sh OUT_DIR      -> OUT_DIR/text/<fortune files>
#
# Idempotent: does nothing when OUT_DIR/text already holds files. The trainer turns the
# text into shards and vocab.txt itself (prepare_text_corpus in data.h).
set -euo pipefail

fail() { echo "get_corpus: $*" >&2; exit 1; }

[ $# -eq 1 ] || fail "usage: scripts/get_corpus.sh OUT_DIR"
out_dir=$1
text_dir=$out_dir/text

if [ -d "$text_dir" ] && [ -n "$(ls -A "$text_dir")" ]; then
    echo "get_corpus: $text_dir already has files; nothing to do"
    exit 0
fi

for tool in apt-get apt-cache dpkg; do
    command -v "$tool" >/dev/null || fail "needs $tool (a Debian/Ubuntu system) to fetch the fortunes packages"
done

packages="fortunes fortunes-min"
# Package lists can be empty on a fresh container; refresh them once, only when needed.
refreshed=0
refresh() { [ $refreshed -eq 1 ] && return 1; refreshed=1; apt-get update -qq >/dev/null 2>&1 || true; }

for pkg in $packages; do
    apt-cache show "$pkg" >/dev/null 2>&1 || { refresh; apt-cache show "$pkg" >/dev/null 2>&1; } ||
        fail "package '$pkg' is not known to apt (apt-cache show $pkg fails); cannot fetch the corpus"
done

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
chmod 755 "$tmp"  # let apt's unprivileged _apt user write the download here

download() { (cd "$tmp" && apt-get download $packages >/dev/null 2>&1); }
download || { refresh; download; } ||
    fail "apt-get download $packages failed (no mirror reachable?)"

for deb in "$tmp"/*.deb; do
    dpkg -x "$deb" "$tmp/root" || fail "dpkg -x $deb failed"
done
src=$tmp/root/usr/share/games/fortunes
[ -d "$src" ] || fail "the packages hold no usr/share/games/fortunes directory"

# The text files only: not the .dat indexes, not the .u8 links to the same text.
mkdir -p "$out_dir"
stage=$(mktemp -d "$out_dir/.text.XXXXXX")
find "$src" -maxdepth 1 -type f ! -name '*.dat' ! -name '*.u8' -exec cp {} "$stage/" \;
n_files=$(find "$stage" -type f | wc -l)
[ "$n_files" -gt 0 ] || { rm -rf "$stage"; fail "no fortune text files found in the packages"; }
chmod 755 "$stage"
rmdir "$text_dir" 2>/dev/null || true  # an empty leftover
mv "$stage" "$text_dir"

# Documents as data.h counts them: separated by blank lines or lines that are exactly "%".
bytes=$(cat "$text_dir"/* | wc -c)
docs=$(awk '
    FNR == 1 { if (open) n++; open = 0 }
    { sub(/\r$/, "") }
    /^%$/ || /^[ \t]*$/ { if (open) n++; open = 0; next }
    { open = 1 }
    END { if (open) n++; print n + 0 }' "$text_dir"/*)
echo "get_corpus: $n_files files, $bytes bytes, $docs documents in $text_dir"
