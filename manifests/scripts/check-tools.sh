#!/bin/sh
# Installed as /usr/local/bin/check-tools by the dev bottle's `toolchain`
# setup step: tells the agent which tools this sandbox provides.
for tool in git rg cargo rustc python3 node make; do
    if path=$(command -v "$tool" 2>/dev/null); then
        printf '%-8s %s\n' "$tool" "$path"
    else
        printf '%-8s (not installed)\n' "$tool"
    fi
done
