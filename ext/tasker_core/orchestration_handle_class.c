#include "tasker_core.h"

void tc_init_orchestration_handle(void)
{
}
