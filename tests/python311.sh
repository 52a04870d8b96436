#!/usr/bin/env bash
# Prints the path of a Python 3.11 (the project requires >=3.11,<3.12: torch
# 2.14.1 and torchvision 0.29.1 come from local disk for 3.11 only), or fails
# saying so.  Looks on PATH, then pyenv's versions, then installs Debian's
# python3.11 + venv where the distribution has them.
set -euo pipefail
is311() { "$1" -c 'import sys, venv; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; }
for py in python3.11 python3 /usr/bin/python3.11 /usr/local/bin/python3.11 "$HOME"/.pyenv/versions/3.11*/bin/python3.11; do
  path=$(command -v "$py" 2>/dev/null) || continue
  if is311 "$path"; then echo "$path"; exit 0; fi
done
if command -v apt-get > /dev/null; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -q > /dev/null 2>&1 || true
  if [ -n "$(apt-cache policy python3.11-venv 2>/dev/null | grep 'Candidate:' | grep -v '(none)')" ]; then
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q python3.11 python3.11-venv > /dev/null >&2
    is311 /usr/bin/python3.11 && { echo /usr/bin/python3.11; exit 0; }
  fi
fi
echo "mirage needs Python 3.11 (found none on PATH, in pyenv or in this distribution's packages):" \
     "install one and put python3.11 on PATH" >&2
exit 1
