#!/usr/bin/env bash
# unpack_fi_cache.sh TGZ CACHE_DIR SITE_DIR: unpack FlashInfer's JIT cache packed by an earlier call
# (gpu_check.sh with FI_CACHE_OUT=1) into CACHE_DIR so that ninja keeps its objects.
#
# FlashInfer runs ninja on each module's first use (rules with deps = gcc). Ninja rebuilds an object
# whose recorded build time (.ninja_log) is older than one of its inputs, and one whose file is newer
# than the time stored with its header list (.ninja_deps: "stored deps info out of date"). So the
# cache keeps tar's time stamps (touching it to the present trips the second rule: every object is
# rebuilt), and the wheels just installed in SITE_DIR (FlashInfer's headers and sources, time-stamped
# at install) are dated back before any build instead.
set -u
tgz=$1 cache=$2 site=$3
mkdir -p "$cache"
tar xzf "$tgz" -C "$cache" || exit 1
if [ -d "$site" ]; then
  find "$site" -exec touch -h -d "2000-01-01 00:00:00" {} +
fi
