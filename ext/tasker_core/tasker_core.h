/*
 * tasker_core.h: what every file of the extension shares: the Ruby error
 * classes (defined in lib/tasker_core/errors.rb, looked up once at load),
 * the module objects, and the init function of each file.
 */
#ifndef TASKER_CORE_H
#define TASKER_CORE_H

#include <ruby.h>
#include <ruby/encoding.h>
#include <ruby/thread.h>

extern VALUE tc_mTaskerCore;
extern VALUE tc_eError;
extern VALUE tc_eProtocolError;
extern VALUE tc_eConnectionError;
extern VALUE tc_eClosedError;
extern VALUE tc_eThreadOwnershipError;
extern VALUE tc_eForkSafetyError;
extern VALUE tc_eNoWorkersError;
extern VALUE tc_eConfigurationError;
extern VALUE tc_eStoreError;

void tc_init_codec(void);
void tc_init_socket(void);
void tc_init_orchestration_handle(void);
void tc_init_store(void);
void tc_init_curve(void);

#endif
