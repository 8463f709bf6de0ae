#include "tasker_core.h"

void tc_init_socket(void)
{
}
