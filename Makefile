# picotron.cu — two builds of one source, the corpus, and the tests.
#   make run        set-up, build, prepare the default corpus, train the mini demo, show masked predictions
#   make test       the CPU test suite, the emulated CUDA kernels included (no GPU needed); ends with "N passed, M failed"
#   make test-gpu   every CUDA kernel against its reference, on a machine with a GPU
#   make test-emu   the same kernels under the CPU emulator of the CUDA execution model (no GPU needed)
#   make bench-cpu  picotron_cpu vs PyTorch + transformers on the tiny model: s/step and peak memory (out/bench/bench.md)
#   make bench      one GPU: base at seq 1024 and 8192 vs PyTorch + transformers, attention TFLOP/s (out/bench/bench_gpu.md)
SHELL := /bin/bash

MPI_COMPILE := $(shell mpicxx --showme:compile 2>/dev/null)
MPI_LINK    := $(shell mpicxx --showme:link 2>/dev/null)
NVCC        := $(shell command -v nvcc 2>/dev/null)
# the CPU build uses every vector unit of the machine it is built on (make CPU_ARCH= for a portable binary);
# -ffp-contract=off: no fusing of a*b+c into FMAs, so the ops round as the GPU kernels' _rn arithmetic does
CPU_ARCH    ?= -march=native
CXXFLAGS    := -std=c++17 -O2 $(CPU_ARCH) -ffp-contract=off -fopenmp -Wall -Wextra -DOMPI_SKIP_MPICXX
NVCCFLAGS   := -std=c++17 -O2 -arch=sm_90 -DOMPI_SKIP_MPICXX -Xcompiler -fopenmp,-Wall,-Wextra
CUDA_LIBS   := -lcublasLt -lcublas -lnccl -lgomp
HEADERS     := kernels.cuh data.h safetensors.h Makefile
# the BLAS the CPU build links; scripts/install_deps.sh probes the same library
BLAS_LIB    ?= openblas
# mpirun as root (sessions and CI), more ranks than cores; picotron_cpu picks its threads per rank
# itself (one per rank when several share the machine; see --threads)
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1
export OMPI_MCA_rmaps_base_oversubscribe := 1
MPIRUN      := mpirun --oversubscribe

BINARIES := picotron_cpu
ifneq ($(NVCC),)
BINARIES += picotron
endif

.PHONY: all deps data run test test-gpu test-emu bench-cpu bench clean
all: $(BINARIES)

deps:
	@bash scripts/install_deps.sh

picotron_cpu: picotron.cu $(HEADERS)
	g++ $(CXXFLAGS) $(MPI_COMPILE) -x c++ picotron.cu -o $@ $(MPI_LINK) -l$(BLAS_LIB)

picotron: picotron.cu $(HEADERS)
	nvcc $(NVCCFLAGS) $(MPI_COMPILE) picotron.cu -o $@ $(CUDA_LIBS) $(MPI_LINK)

tests/test_%: tests/test_%.cpp picotron.cu $(HEADERS)
	g++ $(CXXFLAGS) -Wno-unused-function $(MPI_COMPILE) -I. $< -o $@ $(MPI_LINK) -l$(BLAS_LIB)

tests/make_model: tests/make_model.cpp picotron.cu $(HEADERS)
	g++ $(CXXFLAGS) -Wno-unused-function $(MPI_COMPILE) -I. $< -o $@ $(MPI_LINK) -l$(BLAS_LIB)

tests/compare_runs: tests/compare_runs.cpp safetensors.h
	g++ $(CXXFLAGS) -I. $< -o $@

tests/dump_info: tests/dump_info.cpp safetensors.h
	g++ $(CXXFLAGS) -I. $< -o $@

tests/st_edit: tests/st_edit.cpp safetensors.h
	g++ $(CXXFLAGS) -I. $< -o $@

tests/test_gpu: tests/test_gpu.cu $(HEADERS)
	nvcc $(NVCCFLAGS) $(MPI_COMPILE) -I. tests/test_gpu.cu -o $@ $(CUDA_LIBS) $(MPI_LINK)

# The CUDA emulator's builds (tests/cuda_emu.h): kernels.cuh's CUDA section compiled by g++ and run
# thread by thread on the CPU, in forward, reverse and random thread order (tests/emu_tests.sh).
EMU_FLAGS := -DPICOTRON_EMULATE -Wno-unused-function
EMU_HEADERS := tests/cuda_emu.h tests/cuda_emu_mma.h
tests/test_gpu_emu: tests/test_gpu.cu $(EMU_HEADERS) $(HEADERS)
	g++ $(CXXFLAGS) $(EMU_FLAGS) $(MPI_COMPILE) -I. -x c++ tests/test_gpu.cu -o $@ $(MPI_LINK)

tests/test_emu: tests/test_emu.cpp $(EMU_HEADERS)
	g++ $(CXXFLAGS) $(EMU_FLAGS) -I. $< -o $@

# and once under AddressSanitizer (out-of-bounds and use-after-free in kernels and launchers)
ASAN_FLAGS := -O1 -g -fsanitize=address -fno-omit-frame-pointer
tests/test_gpu_emu_asan: tests/test_gpu.cu $(EMU_HEADERS) $(HEADERS)
	g++ $(CXXFLAGS) $(ASAN_FLAGS) $(EMU_FLAGS) $(MPI_COMPILE) -I. -x c++ tests/test_gpu.cu -o $@ $(MPI_LINK)

tests/test_emu_asan: tests/test_emu.cpp $(EMU_HEADERS)
	g++ $(CXXFLAGS) $(ASAN_FLAGS) $(EMU_FLAGS) -I. $< -o $@

EMU_BINS := tests/test_emu tests/test_gpu_emu tests/test_emu_asan tests/test_gpu_emu_asan picotron_emu

# picotron.cu's GPU build compiled by g++ under the emulator: the trainer's kernels, cuBLASLt calls,
# streams, events and pinned staging run on the CPU (NCCL is not emulated: run it with --comm mpi).
# tests/emu_trainer.sh trains it against picotron_cpu (1 rank, dp 2, tp 2 with and without --sp, pp 2; under a minute).
# and with cp 2, cp 4 (32-token shards, halos from 2 ranks) and cp 2 × tp 2 --sp.
picotron_emu: picotron.cu $(EMU_HEADERS) $(HEADERS)
	g++ $(CXXFLAGS) $(EMU_FLAGS) $(MPI_COMPILE) -I. -x c++ picotron.cu -o $@ $(MPI_LINK)

test-emu: $(EMU_BINS) picotron_cpu tests/compare_runs data
	@bash tests/emu_tests.sh

# The default corpus: English text from Debian's fortune files, tokenized with the built-in word
# tokenizer (no Python, no hub): data/default for ModernBERT's vocabulary (tiny, base, large),
# data/mini for the demo model's 4096 ids.
data/corpus/text: scripts/get_corpus.sh
	bash scripts/get_corpus.sh data/corpus
data/default/vocab.txt: picotron_cpu | data/corpus/text
	./picotron_cpu --prepare-text data/corpus/text --data data/default
data/mini/vocab.txt: picotron_cpu | data/corpus/text
	./picotron_cpu --model mini --prepare-text data/corpus/text --data data/mini
data: data/default/vocab.txt data/mini/vocab.txt

# The demo: train mini (H 64, 2 layers, 4096 ids) for about 3 minutes on 2 CPU cores (2
# data-parallel ranks; the GPU build when a GPU is present, its ranks sharing it through
# --comm mpi), then ask it to fill in sentences whose
# answers need their context: a model of word frequencies alone would answer "the" or ",".
STEPS ?= 4000
RANKS ?= 2
TRAIN_FLAGS := --model mini --data data/mini --seq-len 128 --micro-batch-tokens 1024 --steps $(STEPS) \
               --lr 5e-3 --warmup 50 --log out/mini.jsonl --export out/mini
run: deps
	@$(MAKE) --no-print-directory all data
	@mkdir -p out
	@if [ -x ./picotron ] && nvidia-smi -L >/dev/null 2>&1; then BIN=./picotron; else BIN=./picotron_cpu; fi; \
	  echo "training mini with $$BIN on $(RANKS) data-parallel ranks"; \
	  $(MPIRUN) -np $(RANKS) $$BIN --dp $(RANKS) --comm mpi $(TRAIN_FLAGS)
	@$(MPIRUN) -np 1 ./picotron_cpu --init-from out/mini --data data/mini \
	  --predict "i don't [MASK] what you mean ." \
	  --predict "a [MASK] in the hand is worth two in the bush ." \
	  --predict "if at first you don't [MASK] , try , try again ." \
	  --predict "it is better to [MASK] than to [MASK] ." \
	  --predict "on the other [MASK] , you have different fingers ." \
	  --predict "to err is [MASK] ."

TEST_BINS := tests/test_ops tests/test_data tests/test_safetensors tests/test_model tests/test_comm tests/compare_runs \
             tests/st_edit tests/make_model tests/dump_info
# the test binaries build in parallel, one compiler per core (a third of make test's time on 2 cores otherwise)
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
test: deps
	@$(MAKE) --no-print-directory -j$(JOBS) picotron_cpu $(TEST_BINS) $(EMU_BINS) data
	@bash tests/run_tests.sh

test-gpu: picotron picotron_cpu tests/test_gpu tests/compare_runs data
	./tests/test_gpu
	bash tests/gpu_vs_cpu.sh

# The CPU benchmark (scripts/bench_cpu.py): the tiny model trained by picotron_cpu and by torch +
# transformers on the same synthetic documents, 1 and 2 threads; torch is needed for this target only.
bench-cpu: picotron_cpu
	@python3 -c "import torch, transformers" 2>/dev/null || \
	  { echo "make bench-cpu needs PyTorch and transformers: run pip install torch transformers numpy"; exit 1; }
	python3 scripts/bench_cpu.py

# The GPU benchmark (scripts/bench_gpu.py): base trained by picotron at seq 1024 and 8192 (tokens/s,
# MFU, peak memory, time per op class) and by torch + transformers on the same GPU and batch
# (scripts/bench_torch.py), and the attention kernels' TFLOP/s (scripts/bench_attention.cu). The GPU
# check comes first, so that a machine without one gets one line and builds nothing.
out/bench/bench_attention: scripts/bench_attention.cu $(HEADERS)
	@mkdir -p out/bench
	nvcc $(NVCCFLAGS) $(MPI_COMPILE) -I. $< -o $@ $(CUDA_LIBS) $(MPI_LINK)
bench:
	@if ! command -v nvidia-smi >/dev/null; then echo "make bench needs an NVIDIA GPU: nvidia-smi not found"; exit 1; fi
	@if ! nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then echo "make bench needs an NVIDIA GPU: nvidia-smi -L lists none"; exit 1; fi
	@[ -n "$(NVCC)" ] || { echo "make bench needs nvcc (the CUDA toolkit) to build picotron"; exit 1; }
	@python3 -c "import numpy, transformers, torch; assert torch.cuda.is_available()" 2>/dev/null || \
	  { echo "make bench needs PyTorch with CUDA, transformers and numpy (pip install torch transformers numpy)"; exit 1; }
	@$(MAKE) --no-print-directory picotron out/bench/bench_attention
	python3 scripts/bench_gpu.py

clean:
	rm -f picotron picotron_cpu $(TEST_BINS) tests/test_gpu $(EMU_BINS)
