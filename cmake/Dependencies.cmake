# Every external dependency, found once. Debian packages: see cmake/install-deps.sh.

find_package(OpenMP REQUIRED COMPONENTS CXX)
find_package(Threads REQUIRED)
find_package(MPI REQUIRED COMPONENTS C CXX)
set(HDF5_PREFER_PARALLEL TRUE)
find_package(HDF5 REQUIRED COMPONENTS C)
find_package(Protobuf REQUIRED)
find_package(Boost REQUIRED COMPONENTS program_options)
find_package(GTest REQUIRED)
# SentencePiece (libsentencepiece-dev): only data/sentencepiece_shim.cpp links it (see there).
find_library(SENTENCEPIECE_LIBRARY sentencepiece REQUIRED)
find_library(SENTENCEPIECE_TRAIN_LIBRARY sentencepiece_train REQUIRED)
find_path(SENTENCEPIECE_INCLUDE_DIR sentencepiece_processor.h REQUIRED)
# OpenBLAS built with OpenMP (Debian's libopenblas-openmp-dev): BLAS then shares our OpenMP thread
# pool. With the pthread build, its spinning workers and ours fight over the cores (2 threads ran
# slower than 1 on a 2-core machine).
find_library(OPENBLAS_LIBRARY openblas PATHS /usr/lib/x86_64-linux-gnu/openblas-openmp NO_DEFAULT_PATH)
find_path(CBLAS_INCLUDE_DIR cblas.h PATHS /usr/include/x86_64-linux-gnu/openblas-openmp NO_DEFAULT_PATH)
if(NOT OPENBLAS_LIBRARY OR NOT CBLAS_INCLUDE_DIR)
  message(WARNING "OpenMP build of OpenBLAS not found (libopenblas-openmp-dev); using the default BLAS")
  set(BLA_VENDOR OpenBLAS)
  find_package(BLAS REQUIRED)
  set(OPENBLAS_LIBRARY BLAS::BLAS)
  find_path(CBLAS_INCLUDE_DIR cblas.h REQUIRED)
endif()

if(HYDRA_CUDA)
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
    # Hopper (H100/H200) is what we run on; add more with -DCMAKE_CUDA_ARCHITECTURES="80;90a".
    set(CMAKE_CUDA_ARCHITECTURES 90a)
  endif()
  if(NOT DEFINED CMAKE_CUDA_HOST_COMPILER)
    set(CMAKE_CUDA_HOST_COMPILER ${CMAKE_CXX_COMPILER})
  endif()
  enable_language(CUDA)
  # CMake 3.25 does not know nvcc's C++20 flag (nvcc >= 12 has it): teach it.
  set(CMAKE_CUDA20_STANDARD_COMPILE_OPTION "-std=c++20")
  set(CMAKE_CUDA20_EXTENSION_COMPILE_OPTION "-std=c++20")
  set(CMAKE_CUDA_STANDARD 20)
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  find_package(CUDAToolkit REQUIRED)
  set(_cuda_lib_hints ${CUDAToolkit_LIBRARY_DIR} ${CUDAToolkit_LIBRARY_ROOT}/lib ${CUDAToolkit_LIBRARY_ROOT}/lib64)
  find_library(NCCL_LIBRARY nccl HINTS ${_cuda_lib_hints} REQUIRED)
  find_library(CUDNN_LIBRARY cudnn HINTS ${_cuda_lib_hints} REQUIRED)
  find_path(NCCL_INCLUDE_DIR nccl.h HINTS ${CUDAToolkit_INCLUDE_DIRS} REQUIRED)
  find_path(CUDNN_INCLUDE_DIR cudnn.h HINTS ${CUDAToolkit_INCLUDE_DIRS} REQUIRED)
  set(_hydra_cuda_arch_msg " (architectures ${CMAKE_CUDA_ARCHITECTURES}, nvcc ${CMAKE_CUDA_COMPILER_VERSION})")
endif()
