# Helpers that give every Hydra target the same flags, and tests their labels.

# hydra_library(NAME SOURCES... [CUDA_SOURCES...] [DEPS...])
function(hydra_library name)
  cmake_parse_arguments(ARG "" "" "SOURCES;CUDA_SOURCES;DEPS" ${ARGN})
  set(_sources ${ARG_SOURCES})
  if(HYDRA_CUDA)
    list(APPEND _sources ${ARG_CUDA_SOURCES})
  endif()
  add_library(${name} STATIC ${_sources})
  target_include_directories(${name} PUBLIC ${PROJECT_SOURCE_DIR} ${PROJECT_BINARY_DIR})
  target_link_libraries(${name} PUBLIC ${ARG_DEPS})
  hydra_target_flags(${name})
endfunction()

function(hydra_target_flags name)
  target_compile_options(${name} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wno-unused-parameter>)
  if(HYDRA_WERROR)
    target_compile_options(${name} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-Werror>)
  endif()
  if(HYDRA_CPU_ARCH)
    target_compile_options(${name} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-march=${HYDRA_CPU_ARCH}>)
  endif()
  target_compile_options(${name} PRIVATE
    $<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr -Xcompiler=-Wall,-Wno-unused-parameter>)
  if(HYDRA_CUDA)
    target_compile_definitions(${name} PUBLIC HYDRA_WITH_CUDA=1)
  else()
    target_compile_definitions(${name} PUBLIC HYDRA_WITH_CUDA=0)
  endif()
endfunction()

# hydra_executable(NAME SOURCES... DEPS...)
function(hydra_executable name)
  cmake_parse_arguments(ARG "" "" "SOURCES;DEPS" ${ARGN})
  add_executable(${name} ${ARG_SOURCES})
  target_link_libraries(${name} PRIVATE ${ARG_DEPS})
  hydra_target_flags(${name})
endfunction()

# hydra_gtest(NAME LABEL label SOURCES... DEPS...): a GoogleTest binary whose tests ctest runs with the
# label. Tests named *Slow* carry the label `slow` instead (gtest_discover_tests flattens a list-valued
# LABELS into separate words, so "unit;slow" gave them no `slow` label at all). GPU tests skip
# (GTEST_SKIP) without a device; ctest reports them as skipped.
function(hydra_gtest name)
  cmake_parse_arguments(ARG "" "LABEL" "SOURCES;DEPS" ${ARGN})
  hydra_executable(${name} SOURCES ${ARG_SOURCES} DEPS ${ARG_DEPS} GTest::gtest GTest::gtest_main)
  set_target_properties(${name} PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/tests)
  gtest_discover_tests(${name}
    TEST_FILTER "-*Slow*"
    PROPERTIES LABELS "${ARG_LABEL}" SKIP_REGULAR_EXPRESSION "\\[  SKIPPED \\]"
    DISCOVERY_TIMEOUT 60)
  gtest_discover_tests(${name}
    TEST_FILTER "*Slow*"
    PROPERTIES LABELS slow SKIP_REGULAR_EXPRESSION "\\[  SKIPPED \\]"
    DISCOVERY_TIMEOUT 60)
endfunction()

# hydra_mpi_test(NAME TARGET NP [FILTER gtest-filter]): runs a GoogleTest binary under mpiexec.
function(hydra_mpi_test name)
  cmake_parse_arguments(ARG "" "TARGET;NP;FILTER" "" ${ARGN})
  set(_filter "*")
  if(ARG_FILTER)
    set(_filter ${ARG_FILTER})
  endif()
  add_test(NAME ${name}
    COMMAND ${MPIEXEC_EXECUTABLE} --oversubscribe ${MPIEXEC_NUMPROC_FLAG} ${ARG_NP}
            $<TARGET_FILE:${ARG_TARGET}> --gtest_filter=${_filter})
  set_tests_properties(${name} PROPERTIES LABELS mpi PROCESSORS ${ARG_NP}
    ENVIRONMENT "OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1;HYDRA_NUM_THREADS=1;OMPI_MCA_rmaps_base_oversubscribe=1"
    TIMEOUT 600)
endfunction()
