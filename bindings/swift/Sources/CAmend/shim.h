/* The amend C API, found through pkg-config (ffi/install.sh installs amend.h and amend.pc). */
#include <amend.h>
