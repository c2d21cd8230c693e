#!/bin/bash
# Run snakemake, and every job it starts, on an emulated CPU (QEMU user mode), to see how a run's
# numbers move on a CPU this machine does not have. The emulated CPU decides which kernels torch,
# MKL, OpenBLAS and oneDNN pick, and QEMU computes their instructions for that CPU. Slow: the
# default's five single-edit jobs took 22 times as long as natively on an emulated x86-64 CPU and
# 15 times on an emulated ARM CPU, a 512 x 512 fp32 matrix product 200 and 350 times.
#
#   analyses/emulated_cpu.sh QEMU CPU SNAKEMAKE_ARGS...
#
# An x86-64 CPU (QEMU is a qemu-x86_64(-static)): the venv's own python runs under QEMU, e.g. an
# Intel Haswell (AVX2, Intel's MKL code paths):
#   analyses/emulated_cpu.sh /usr/bin/qemu-x86_64-static Haswell-noTSX,-pcid,-x2apic,-tsc-deadline,-invpcid \
#       --configfile config.yaml --cores 1 --forcerun single_edits --until single_edits
# (the CPU's '-' features are those QEMU cannot emulate, left out to keep it quiet)
#
# An ARM CPU (QEMU is a qemu-aarch64(-static)): the first call builds .cache/arm64/, a Debian
# bookworm arm64 Python 3.11 (debootstrap's first stage, unpacked without chroot) and the venv's
# packages as aarch64 wheels (pip --platform, no emulation). torch is 2.9.1 there, the CPU build with
# OpenBLAS: PyPI's aarch64 wheels of 2.13.0 are CUDA builds that need the CUDA libraries to import.
# E.g. 256-bit SVE, as on a Neoverse V1 (torch's SVE256 kernels):
#   analyses/emulated_cpu.sh /usr/bin/qemu-aarch64-static max,sve-default-vector-length=32 \
#       --configfile config.yaml --cores 2 --forcerun single_edits --until single_edits
#
# Run it in a clone after a native `make reproduce`, with the tables it will overwrite copied aside,
# and compare the two (python -m editlib.study.compare). QEMU: Debian's qemu-user-static; CPU: a
# model of `QEMU -cpu help`, with its properties. The wrapper it writes starts python under QEMU
# with sys.executable pointing at the wrapper, so that the jobs snakemake starts are emulated too.
set -euo pipefail
qemu=$(readlink -f "$1"); cpu=$2; shift 2
repo=$(pwd)
venv="$repo/.venv"
case "$(basename "$qemu")" in
*aarch64*)
    arm="$repo/.cache/arm64"
    if [[ ! -x "$arm/root/usr/bin/python3.11" ]]; then
        rm -rf "$arm/root"
        debootstrap --arch=arm64 --foreign --variant=minbase --include=python3.11 \
            bookworm "$arm/root" http://deb.debian.org/debian
        for deb in "$arm"/root/var/cache/apt/archives/*.deb; do dpkg -x "$deb" "$arm/root"; done
    fi
    if [[ ! -f "$arm/site/.installed" ]]; then
        rm -rf "$arm/site"
        "$venv/bin/python" -m pip freeze --exclude-editable | sed 's/^torch==.*/torch==2.9.1/' \
            > "$arm/requirements.txt"
        "$venv/bin/python" -m pip install --target "$arm/site" --no-deps --prefer-binary \
            --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 --platform linux_aarch64 \
            --python-version 3.11 --implementation cp --abi cp311 -r "$arm/requirements.txt"
        touch "$arm/site/.installed"
    fi
    # pulp's CBC solver (snakemake's default ilp scheduler) is an x86-64 binary the emulated python
    # cannot start: the greedy scheduler instead
    set -- --scheduler greedy "$@"
    wrapper="$arm/python"
    cat > "$wrapper" <<WRAPPER
#!/bin/bash
export PYTHONPATH="$arm/site:$repo"
exec "$qemu" -cpu "$cpu" -L "$arm/root" -0 "\$0" "$arm/root/usr/bin/python3.11" "\$@"
WRAPPER
    ;;
*)
    python=$(readlink -f "$venv/bin/python")
    wrapper="$venv/bin/python-emulated"
    cat > "$wrapper" <<WRAPPER
#!/bin/bash
exec "$qemu" -cpu "$cpu" -0 "\$0" "$python" "\$@"
WRAPPER
    ;;
esac
chmod +x "$wrapper"
"$wrapper" -c "import platform, torch; print('emulated CPU $cpu:', platform.machine(), 'torch', torch.__version__, 'CPU capability', torch.backends.cpu.get_cpu_capability())"
exec "$wrapper" -m snakemake "$@"
