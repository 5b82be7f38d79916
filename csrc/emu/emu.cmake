# mixtral_ext/_emu*.so: the kernels' CUDA sources compiled as host C++ (-DMIXTRAL_EMU) against the emulation runtime.
#   csrc/emu/runtime.cpp        fibers, barriers, warp collectives, race / bounds / deadlock checks (not instrumented)
#   csrc/kernels/*.cu, selftest  compiled with -fsanitize=thread but NOT linked with libtsan: the runtime defines the
#                               __tsan_* hooks, which is how it sees every plain load and store of kernel code
#   csrc/emu/emu_ops.cpp        the torch binding (torch.ops.mixtral_emu.*); links libc10 and libtorch_cpu only, so
#                               the target needs neither a CUDA toolkit nor torch's CMake config
set(MIXTRAL_EXT_EMU_OUTPUT "${CMAKE_SOURCE_DIR}/mixtral_ext/_emu.so" CACHE FILEPATH "where the emulation library goes")
if(NOT MIXTRAL_EXT_TORCH_INCLUDE OR NOT MIXTRAL_EXT_TORCH_LIBDIR)
  if(NOT Python_EXECUTABLE)
    find_program(Python_EXECUTABLE NAMES python3 python REQUIRED)
  endif()
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c "import os, torch; r = os.path.dirname(torch.__file__); print(os.path.join(r, 'include') + ',' + os.path.join(r, 'include', 'torch', 'csrc', 'api', 'include') + '|' + os.path.join(r, 'lib') + '|' + str(int(torch.compiled_with_cxx11_abi())))"
    OUTPUT_VARIABLE _torch_paths OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _torch_rc)
  if(NOT _torch_rc EQUAL 0)
    message(FATAL_ERROR "mixtral_ext: the emulation target needs torch importable by ${Python_EXECUTABLE}")
  endif()
  string(REPLACE "|" ";" _torch_paths "${_torch_paths}")
  list(GET _torch_paths 0 _inc)
  list(GET _torch_paths 1 _lib)
  list(GET _torch_paths 2 _abi)
  string(REPLACE "," ";" _inc "${_inc}")
  set(MIXTRAL_EXT_TORCH_INCLUDE "${_inc}")
  set(MIXTRAL_EXT_TORCH_LIBDIR "${_lib}")
  set(MIXTRAL_EXT_TORCH_CXX11_ABI "${_abi}")
endif()
if(NOT DEFINED MIXTRAL_EXT_TORCH_CXX11_ABI)
  set(MIXTRAL_EXT_TORCH_CXX11_ABI 1)
endif()

# .cu files are CUDA sources to the _C target; the emulation target compiles them as C++ through one-line wrappers
# (source-file LANGUAGE is per directory, not per target). file(CONFIGURE) rewrites a wrapper only when it changes.
file(GLOB _emu_kernel_sources CONFIGURE_DEPENDS ${CMAKE_SOURCE_DIR}/csrc/kernels/*.cu)
list(APPEND _emu_kernel_sources ${CMAKE_SOURCE_DIR}/csrc/emu/selftest.cu ${CMAKE_SOURCE_DIR}/csrc/emu/sm90_selftest.cu
            ${CMAKE_SOURCE_DIR}/csrc/emu/ptx_selftest.cu)
set(_emu_wrappers "")
foreach(_cu IN LISTS _emu_kernel_sources)
  get_filename_component(_stem "${_cu}" NAME_WE)
  set(_wrapper "${CMAKE_BINARY_DIR}/emu_src/${_stem}.cpp")
  file(CONFIGURE OUTPUT "${_wrapper}" CONTENT "#include \"${_cu}\"\n" @ONLY)
  list(APPEND _emu_wrappers "${_wrapper}")
endforeach()

add_library(mixtral_emu_kernels OBJECT ${_emu_wrappers})
target_include_directories(mixtral_emu_kernels PRIVATE ${CMAKE_SOURCE_DIR}/csrc ${CMAKE_SOURCE_DIR}/csrc/kernels)
target_compile_definitions(mixtral_emu_kernels PRIVATE MIXTRAL_EMU)
# -O1: a fraction of -O2's compile time on 2 cores, and loads/stores stay where the source has them for the reports.
target_compile_options(mixtral_emu_kernels PRIVATE -O1 -g -fsanitize=thread --param tsan-instrument-func-entry-exit=0
                       -fno-omit-frame-pointer)

add_library(mixtral_ext_emu SHARED ${CMAKE_SOURCE_DIR}/csrc/emu/runtime.cpp ${CMAKE_SOURCE_DIR}/csrc/emu/emu_ops.cpp
            ${CMAKE_SOURCE_DIR}/csrc/emu/sm90.cpp ${CMAKE_SOURCE_DIR}/csrc/emu/sm90_ops.cpp
            $<TARGET_OBJECTS:mixtral_emu_kernels>)
target_include_directories(mixtral_ext_emu PRIVATE ${CMAKE_SOURCE_DIR}/csrc/emu ${CMAKE_SOURCE_DIR}/csrc/kernels
                           ${CMAKE_SOURCE_DIR}/csrc)
set_source_files_properties(${CMAKE_SOURCE_DIR}/csrc/emu/emu_ops.cpp ${CMAKE_SOURCE_DIR}/csrc/emu/sm90_ops.cpp PROPERTIES
  INCLUDE_DIRECTORIES "${MIXTRAL_EXT_TORCH_INCLUDE}"
  COMPILE_DEFINITIONS "_GLIBCXX_USE_CXX11_ABI=${MIXTRAL_EXT_TORCH_CXX11_ABI}")
target_compile_options(mixtral_ext_emu PRIVATE -O2 -g)
target_link_directories(mixtral_ext_emu PRIVATE "${MIXTRAL_EXT_TORCH_LIBDIR}")
target_link_libraries(mixtral_ext_emu PRIVATE c10 torch_cpu)
target_link_options(mixtral_ext_emu PRIVATE -Wl,--no-undefined -Wl,--as-needed "-Wl,-rpath,${MIXTRAL_EXT_TORCH_LIBDIR}")
get_filename_component(_emu_dir "${MIXTRAL_EXT_EMU_OUTPUT}" DIRECTORY)
get_filename_component(_emu_name "${MIXTRAL_EXT_EMU_OUTPUT}" NAME)
set_target_properties(mixtral_ext_emu PROPERTIES
  PREFIX "" SUFFIX "" OUTPUT_NAME "${_emu_name}" LIBRARY_OUTPUT_DIRECTORY "${_emu_dir}")
message(STATUS "mixtral_ext: emulation target -> ${MIXTRAL_EXT_EMU_OUTPUT}")
