#include "tasker_core.h"

void tc_init_codec(void)
{
}
