module github.com/asdispatch/asdispatch/integration

go 1.26.8

replace github.com/asdispatch/asdispatch => ../
