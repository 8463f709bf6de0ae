/*
 * tasker_core.c: the extension's entry point. Looks up the error classes
 * that lib/tasker_core/errors.rb defined and calls each file's init.
 */
#include "tasker_core.h"

VALUE tc_mTaskerCore;
VALUE tc_eError;
VALUE tc_eProtocolError;
VALUE tc_eConnectionError;
VALUE tc_eClosedError;
VALUE tc_eThreadOwnershipError;
VALUE tc_eForkSafetyError;
VALUE tc_eNoWorkersError;
VALUE tc_eConfigurationError;
VALUE tc_eStoreError;

static VALUE tc_error_class(const char *name)
{
    VALUE klass = rb_const_get(tc_mTaskerCore, rb_intern(name));
    rb_gc_register_mark_object(klass);
    return klass;
}

RUBY_FUNC_EXPORTED void Init_tasker_core_ext(void)
{
    tc_mTaskerCore = rb_define_module("TaskerCore");
    if (!rb_const_defined(tc_mTaskerCore, rb_intern("Error")))
        rb_require("tasker_core/errors");

    tc_eError = tc_error_class("Error");
    tc_eProtocolError = tc_error_class("ProtocolError");
    tc_eConnectionError = tc_error_class("ConnectionError");
    tc_eClosedError = tc_error_class("ClosedError");
    tc_eThreadOwnershipError = tc_error_class("ThreadOwnershipError");
    tc_eForkSafetyError = tc_error_class("ForkSafetyError");
    tc_eNoWorkersError = tc_error_class("NoWorkersError");
    tc_eConfigurationError = tc_error_class("ConfigurationError");
    tc_eStoreError = tc_error_class("StoreError");

    tc_init_codec();
    tc_init_socket();
    tc_init_orchestration_handle();
    tc_init_store();
    tc_init_curve();
}
