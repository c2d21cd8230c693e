#!/bin/bash
# Run snakemake, and every job it starts, on an emulated CPU (QEMU user mode), to see how a run's
# numbers move on a CPU this machine does not have: the emulated CPU's CPUID decides which kernels
# torch, MKL and oneDNN pick (e.g. an Intel Haswell: AVX2, Intel's MKL code paths), and QEMU
# computes their instructions for that CPU. Slow: the default's five single-edit jobs took 22 times
# as long as natively, a 512 x 512 fp32 matrix product 200 times.
#
#   analyses/emulated_cpu.sh QEMU CPU SNAKEMAKE_ARGS...
#   analyses/emulated_cpu.sh /usr/bin/qemu-x86_64-static Haswell-noTSX,-pcid,-x2apic,-tsc-deadline,-invpcid \
#       --configfile config.yaml --cores 1 --forcerun single_edits --until single_edits
#
# (after a native `make reproduce` in the same clone, with its tables copied aside: the forced jobs
# overwrite them; the CPU's '-' features are those QEMU cannot emulate, left out to keep it quiet)
#
# QEMU: a qemu-x86_64(-static) binary (Debian: qemu-user-static); CPU: a model of `QEMU -cpu help`.
# It writes .venv/bin/python-emulated, a wrapper that starts the venv's python under QEMU with
# sys.executable pointing at itself, so that the jobs snakemake starts with sys.executable are
# emulated too. Compare the outputs with a native run's (python -m editlib.study.compare).
set -euo pipefail
qemu=$1; cpu=$2; shift 2
venv=$(cd .venv && pwd)
python=$(readlink -f "$venv/bin/python")
wrapper="$venv/bin/python-emulated"
cat > "$wrapper" <<WRAPPER
#!/bin/bash
exec "$qemu" -cpu "$cpu" -0 "\$0" "$python" "\$@"
WRAPPER
chmod +x "$wrapper"
"$wrapper" -c "import torch; print('emulated CPU $cpu: torch CPU capability', torch.backends.cpu.get_cpu_capability())"
exec "$wrapper" "$venv/bin/snakemake" "$@"
