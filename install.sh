#!/usr/bin/env bash
# Installs framebroker into .venv, a virtual environment beside this file, with the system's
# Python 3 (3.8 or newer): Debian 12 and Ubuntu 23.04+ refuse `pip install` into the system
# Python (PEP 668), and a venv is how they ask to be used. The venv module comes with apt when
# it is missing (python3.X-venv, with sudo if not root), and so do gcc and python3.X-dev, which
# build the compiled frame path.
#
#   bash install.sh          # then: .venv/bin/framebroker demo (the package editable, from here)
#   bash install.sh --dev    # editable, with the test, bench and zenoh extras (README, Development)
#
# PYTHON=/path/to/python3 picks another interpreter.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON="${PYTHON:-python3}"
SPEC="."
case "${1:-}" in
    "") ;;
    --dev) SPEC=".[test,bench,zenoh]" ;;
    *) echo "usage: bash install.sh [--dev]" >&2; exit 2 ;;
esac

apt_install() {
    local sudo=""
    if [ "$(id -u)" != 0 ]; then
        if ! command -v sudo > /dev/null; then
            echo "install.sh: $* must be installed with apt, as root (sudo is not available)" >&2
            exit 1
        fi
        sudo="sudo"
    fi
    echo "install.sh: installing $* with apt" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" > /dev/null
}

if ! command -v "$PYTHON" > /dev/null; then
    apt_install python3
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 8))'; then
    echo "install.sh: framebroker needs Python 3.8 or newer; $PYTHON is $("$PYTHON" -V 2>&1)." \
        "Run it with PYTHON=/path/to/python3.8-or-newer bash install.sh" >&2
    exit 1
fi
# Debian and Ubuntu ship the venv module's pip bootstrap (ensurepip) separately.
if ! "$PYTHON" -c 'import ensurepip, venv' 2> /dev/null; then
    apt_install "python$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')-venv"
fi

# The compiled frame path (framebroker/_fastpath.c) needs a C compiler and the Python headers;
# without them the install still works, on the slower pure-Python frame path.
if ! command -v cc > /dev/null || ! "$PYTHON" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
    if command -v apt-get > /dev/null; then
        apt_install gcc "python$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')-dev"
    else
        echo "install.sh: no C compiler or no Python headers: framebroker will run its pure-Python frame path" >&2
    fi
fi

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# The pip inside a new venv can be old (Ubuntu 20.04's is 20.0): a current one knows the wheels.
.venv/bin/python -m pip install --quiet --upgrade pip
# Editable, so that this clone is the package: the commands' own children (`python -m
# framebroker ...`, started from wherever the user is, often this folder) then import the same
# code, with the compiled frame path built into framebroker/ beside it.
.venv/bin/python -m pip install --quiet -e "$SPEC"
path="$(.venv/bin/python -W ignore -c 'import framebroker._fast as f; print("compiled" if f.compiled() else "pure-Python (" + f.why_pure + ")")')"
echo "install.sh: framebroker $(.venv/bin/python -W ignore -c 'import framebroker; print(framebroker.__version__)') is in .venv, on the $path frame path: run .venv/bin/framebroker" >&2
