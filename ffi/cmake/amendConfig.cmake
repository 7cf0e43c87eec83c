# CMake package config for amend: find_package(amend) then link one of
#   amend::amend         the static library (libamend.a) with its native dependencies
#   amend::amend_shared  the shared library (libamend.so)
# Installed as <prefix>/lib/cmake/amend/amendConfig.cmake by ffi/install.sh.

get_filename_component(_amend_prefix "${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)

# Native libraries a static link needs (pinned by scripts/test.d/ffi.sh against
# `rustc --print native-static-libs`; llama.cpp is C++).
set(AMEND_STATIC_NATIVE_LIBS dl stdc++ gcc_s util rt pthread m dl c)

if(NOT TARGET amend::amend)
  add_library(amend::amend STATIC IMPORTED)
  set_target_properties(amend::amend PROPERTIES
    IMPORTED_LOCATION "${_amend_prefix}/lib/libamend.a"
    INTERFACE_INCLUDE_DIRECTORIES "${_amend_prefix}/include"
    INTERFACE_LINK_LIBRARIES "${AMEND_STATIC_NATIVE_LIBS}")
endif()

if(NOT TARGET amend::amend_shared AND EXISTS "${_amend_prefix}/lib/libamend.so")
  add_library(amend::amend_shared SHARED IMPORTED)
  set_target_properties(amend::amend_shared PROPERTIES
    IMPORTED_LOCATION "${_amend_prefix}/lib/libamend.so"
    INTERFACE_INCLUDE_DIRECTORIES "${_amend_prefix}/include")
endif()

set(amend_INCLUDE_DIRS "${_amend_prefix}/include")
set(amend_LIBRARIES amend::amend)
set(amend_FOUND TRUE)
unset(_amend_prefix)
