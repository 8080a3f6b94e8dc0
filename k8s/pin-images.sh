#!/usr/bin/env bash
# Pin images by digest. Run it on a machine with registry access (CI, a workstation), review the diff, commit.
#
#   k8s/pin-images.sh [FILE...]           resolve the entries without a digest (the TODOs) and write their digests
#   k8s/pin-images.sh --update [FILE...]  resolve every entry again (after changing a newTag) and rewrite the digests
#   k8s/pin-images.sh --check [FILE...]   resolve every entry; list those whose tag now names other content (exit 1)
#
# FILE: kustomize files with an `images:` table; default k8s/components/images/kustomization.yaml, the table of the
# third-party images (pass k8s/overlays/prod/kustomization.yaml as well to pin the pushed m2d2 images). An entry is
#   - name: <image>            newName: <image> (optional)   newTag: <tag>   digest: sha256:<64 hex> (optional)
# and the digest resolved is the one of <newName or name>:<newTag> - for multi-architecture images, the index
# (what `crane digest` prints; with skopeo, the sha256 of the raw top-level manifest).
# After writing the table, the digests are mirrored into the references kustomize does not render:
#   k8s/flyte/values.yaml        `repository: <name>` + `tag: <tag>@sha256:...`
#   containers/*.Dockerfile      `FROM <name>:<tag>@sha256:...`
# Needs crane (github.com/google/go-containerregistry) or skopeo, plus awk and sed.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
MODE=missing
case "${1:-}" in
  --update) MODE=update; shift ;;
  --check) MODE=check; shift ;;
  -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
esac
FILES=("$@")
[ ${#FILES[@]} -gt 0 ] || FILES=("$ROOT/k8s/components/images/kustomization.yaml")

resolve() {  # resolve REF -> sha256:<hex>
  if command -v crane >/dev/null 2>&1; then
    crane digest "$1"
  elif command -v skopeo >/dev/null 2>&1; then
    printf 'sha256:%s\n' "$(skopeo inspect --raw "docker://$1" | sha256sum | cut -d' ' -f1)"
  else
    echo "pin-images.sh: needs crane or skopeo" >&2
    exit 2
  fi
}

# entries FILE -> one line per entry of its images: table: name<TAB>ref<TAB>tag<TAB>digest ("-" when absent)
entries() {
  awk '
    function flush() { if (name != "") print name "\t" (newname != "" ? newname : name) "\t" (tag != "" ? tag : "-") "\t" (digest != "" ? digest : "-") }
    /^images:/ { inside = 1; next }
    inside && /^[^ #-]/ { flush(); name = ""; inside = 0 }
    !inside { next }
    /^  - name:/ { flush(); name = $3; newname = ""; tag = ""; digest = ""; next }
    /^    newName:/ { newname = $2 }
    /^    newTag:/ { tag = $2; gsub(/"/, "", tag) }
    /^    digest:/ { digest = $2 }
    END { flush() }
  ' "$1"
}

# set_digest FILE NAME DIGEST - replace (or add, after newTag) the digest line of entry NAME.
set_digest() {
  awk -v want="$2" -v digest="$3" '
    /^  - name:/ { current = $3 }
    /^[^ #-]/ { current = "" }
    current == want && /^    digest:/ { next }
    { print }
    current == want && /^    newTag:/ { print "    digest: " digest }
  ' "$1" >"$1.tmp" && mv "$1.tmp" "$1"
}

# mirror NAME TAG DIGEST - write tag@digest into the Helm values and the Dockerfiles that name the image.
mirror() {
  local name=$1 tag=$2 digest=$3 short f
  awk -v want="$name" -v value="$tag@$digest" '
    $1 == "repository:" && $2 == want { pending = 1; print; next }
    pending && $1 == "tag:" { sub(/tag:.*/, "tag: " value); pending = 0 }
    { print }
  ' "$ROOT/k8s/flyte/values.yaml" >"$ROOT/k8s/flyte/values.yaml.tmp"
  mv "$ROOT/k8s/flyte/values.yaml.tmp" "$ROOT/k8s/flyte/values.yaml"
  short=${name#docker.io/}
  short=${short#library/}
  for f in "$ROOT"/containers/*.Dockerfile; do
    sed -E -i.bak "s#^(FROM[[:space:]]+)(${name//./\\.}|${short//./\\.}):[^[:space:]@]+(@sha256:[0-9a-f]{64})?#\\1\\2:${tag}@${digest}#" "$f"
    rm -f "$f.bak"
  done
}

status=0
for file in "${FILES[@]}"; do
  while IFS=$'\t' read -r name ref tag digest; do
    if [ "$tag" = "-" ]; then
      echo "skip $name: no newTag" >&2
      continue
    fi
    if [ "$MODE" = missing ] && [ "$digest" != "-" ]; then
      continue
    fi
    resolved=$(resolve "$ref:$tag")
    if [ "$MODE" = check ]; then
      if [ "$digest" = "-" ]; then
        echo "TODO     $ref:$tag -> $resolved (not pinned yet)"
        status=1
      elif [ "$digest" != "$resolved" ]; then
        echo "MOVED    $ref:$tag pinned $digest, registry now $resolved"
        status=1
      else
        echo "ok       $ref:$tag $digest"
      fi
      continue
    fi
    echo "pin      $ref:$tag@$resolved"
    set_digest "$file" "$name" "$resolved"
    mirror "$name" "$tag" "$resolved"
  done < <(entries "$file")
done
exit "$status"
