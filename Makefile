# picotron.cu — two builds of one source, the corpus, and the tests.
#   make run        set-up, build, prepare the default corpus, train tiny, show masked predictions
#   make test       the CPU test suite (no GPU needed); ends with "N passed, M failed"
#   make test-gpu   every CUDA kernel against its reference, on a machine with a GPU
SHELL := /bin/bash

MPI_COMPILE := $(shell mpicxx --showme:compile 2>/dev/null)
MPI_LINK    := $(shell mpicxx --showme:link 2>/dev/null)
NVCC        := $(shell command -v nvcc 2>/dev/null)
CXXFLAGS    := -std=c++17 -O2 -Wall -Wextra -DOMPI_SKIP_MPICXX
NVCCFLAGS   := -std=c++17 -O2 -arch=sm_90 -DOMPI_SKIP_MPICXX -Xcompiler -Wall,-Wextra
CUDA_LIBS   := -lcublasLt -lcublas -lnccl
HEADERS     := kernels.cuh data.h safetensors.h
# mpirun as root (sessions and CI), more ranks than cores, one BLAS thread per rank
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1
export OMPI_MCA_rmaps_base_oversubscribe := 1
MPIRUN      := mpirun --oversubscribe -x OPENBLAS_NUM_THREADS=1 -np 1

BINARIES := picotron_cpu
ifneq ($(NVCC),)
BINARIES += picotron
endif

.PHONY: all deps data run test test-gpu clean
all: $(BINARIES)

deps:
	@bash scripts/install_deps.sh

picotron_cpu: picotron.cu $(HEADERS)
	g++ $(CXXFLAGS) $(MPI_COMPILE) -x c++ picotron.cu -o $@ $(MPI_LINK) -lopenblas

picotron: picotron.cu $(HEADERS)
	nvcc $(NVCCFLAGS) $(MPI_COMPILE) picotron.cu -o $@ $(CUDA_LIBS) $(MPI_LINK)

tests/test_%: tests/test_%.cpp picotron.cu $(HEADERS)
	g++ $(CXXFLAGS) -Wno-unused-function $(MPI_COMPILE) -I. $< -o $@ $(MPI_LINK) -lopenblas

tests/compare_runs: tests/compare_runs.cpp safetensors.h
	g++ $(CXXFLAGS) -I. $< -o $@

tests/test_gpu: tests/test_gpu.cu $(HEADERS)
	nvcc $(NVCCFLAGS) $(MPI_COMPILE) -I. tests/test_gpu.cu -o $@ $(CUDA_LIBS) $(MPI_LINK)

# The default corpus: English text from Debian's fortune files, tokenized with the built-in word
# tokenizer (no Python, no hub).
data/default/vocab.txt: picotron_cpu scripts/get_corpus.sh
	bash scripts/get_corpus.sh data/corpus
	./picotron_cpu --prepare-text data/corpus/text --data data/default
data: data/default/vocab.txt

# Train tiny on the GPU build when a GPU is present, else on the CPU build; then ask it questions.
STEPS ?= 120
TRAIN_FLAGS := --model tiny --data data/default --seq-len 256 --micro-batch-tokens 1024 --steps $(STEPS) \
               --lr 3e-3 --warmup 10 --log out/tiny.jsonl --export out/tiny
run: deps
	@$(MAKE) --no-print-directory all data
	@mkdir -p out
	@if [ -x ./picotron ] && nvidia-smi -L >/dev/null 2>&1; then BIN=./picotron; else BIN=./picotron_cpu; fi; \
	  echo "training tiny with $$BIN"; \
	  mpirun -np 1 $$BIN $(TRAIN_FLAGS)
	@./picotron_cpu --init-from out/tiny --data data/default \
	  --predict "the [MASK] of the world is [MASK] ." \
	  --predict "you will [MASK] a long and happy life ." \
	  --predict "a [MASK] in the hand is worth two in the bush ." \
	  --predict "there is no [MASK] like home ."

TEST_BINS := tests/test_ops tests/test_data tests/test_safetensors tests/test_model tests/test_comm tests/compare_runs
test: deps
	@$(MAKE) --no-print-directory picotron_cpu $(TEST_BINS) data
	@bash tests/run_tests.sh

test-gpu: picotron picotron_cpu tests/test_gpu tests/compare_runs data
	./tests/test_gpu
	bash tests/gpu_vs_cpu.sh

clean:
	rm -f picotron picotron_cpu $(TEST_BINS) tests/test_gpu
